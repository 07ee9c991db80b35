"""L²ViT: Linear global attention + Local window attention Vision Transformer.

Paper: `The Linear Attention Resurrection in Vision Transformer` - https://arxiv.org/abs/2501.16182

Original code and weights: https://github.com/ChuanyangZheng/L2ViT (MIT).

Every stage alternates two blocks, starting with the local one:
* LWA (local window attention): CPE, non-shifted window softmax attention without positional bias
  (the map is zero-padded at right/bottom to a multiple of the window, with no mask), CPE, MLP;
* LGA (linear global attention): CPE, ReLU-kernel linear attention over the whole map with a per-head
  temperature and a denominator floor of 100 (``visionmix.kernels.linear_attention(form='l2vit')``),
  the local concentration module (LCM: depthwise 7x7, GELU, BatchNorm, depthwise 7x7) with its own
  pre-norm, MLP.
A two-conv BatchNorm stem (stride 4) and pre-norm 2x2 stride-2 conv downsamplers connect the stages.

Layout differences from the original code (``checkpoint_filter_fn`` converts): the stem and the
downsamplers are ``stem`` and ``stages.{i}.downsample``, blocks sit under ``stages.{i}.blocks``, the
CPEs are ``cpe1``/``cpe2``, the LCM is ``lcm`` and the classifier ``head.fc``. Feature maps are NHWC.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    Mlp,
    calculate_drop_path_rates,
    get_device_dtype,
    trunc_normal_,
    use_fused_attn,
)
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
    register_notrace_module,
)
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from visionmix.checkpoint import load_release_weights
from visionmix.kernels import linear_attention

__all__ = ['L2ViT']


@register_notrace_function
@torch.jit.ignore
def check_image_input(x: torch.Tensor, in_chans: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"x must be an NCHW image batch [B, {in_chans}, H, W], got shape {tuple(x.shape)}")


class ConvStem(nn.Module):
    """Stride-4 stem: conv3x3/s2 -> BN -> ReLU -> conv3x3/s2 -> BN, then LayerNorm; NCHW in, NHWC out.

    The image is zero-padded at right/bottom to a multiple of 4 first, as in the original.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1, **dd)
        self.bn1 = nn.BatchNorm2d(embed_dim // 2, **dd)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1, **dd)
        self.bn2 = nn.BatchNorm2d(embed_dim, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans)
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))
        x = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.norm(x.permute(0, 2, 3, 1))


class PreNormDownsample(nn.Module):
    """LayerNorm on the input channels, zero-pad odd maps at right/bottom, conv 2x2/s2; NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = nn.LayerNorm(dim, **dd)
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        x = self.norm(x).permute(0, 3, 1, 2)
        x = F.pad(x, (0, W % 2, 0, H % 2))
        return self.conv(x).permute(0, 2, 3, 1)


class ConvPosEnc(nn.Module):
    """Conditional position encoding: ``x + act(depthwise 3x3 conv(x))``; NHWC in and out."""

    def __init__(self, dim: int, act: bool = False, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, device=device, dtype=dtype)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.proj(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class LocalConcentration(nn.Module):
    """Local concentration module (LCM): depthwise 7x7 -> GELU -> BatchNorm -> depthwise 7x7; NCHW."""

    def __init__(self, dim: int, kernel_size: int = 7, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.act(self.conv1(x))))


class WindowAttention(nn.Module):
    """Multi-head softmax attention within each window (no positional bias); ``[B*nW, N, C]``."""
    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.,
                 device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


@register_notrace_module
class LinearGlobalAttention(nn.Module):
    """Enhanced linear attention of L²ViT over all tokens: ``tau_h relu(q) S / max(relu(q).z, 100)``.

    ``temperature`` keeps the checkpoint shape ``(heads, 1, 1)``; it is initialised to ``head_dim ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.,
                 device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), self.head_dim ** -0.5, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.jit.ignore
    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3 * C]`` projections -> ``[B, N, C]`` attention output (kept out of TorchScript)."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        x = linear_attention(q, k, v, form='l2vit', temperature=self.temperature.flatten().to(q.dtype),
                             denom_floor=100.0)
        return x.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._attend(self.qkv(x))
        return self.proj_drop(self.proj(x))


class LocalWindowBlock(nn.Module):
    """LWA block: CPE, window attention, CPE, MLP; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            mlp_ratio: float = 4.,
            cpe_act: bool = False,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.window_size = window_size
        self.cpe1 = ConvPosEnc(dim, act=cpe_act, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = WindowAttention(dim, num_heads, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = ConvPosEnc(dim, act=cpe_act, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _window_attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        # padded tokens are zeros after the norm; they take part in the attention unmasked, as in the original
        x = F.pad(x, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        Hp, Wp = x.shape[1:3]
        windows = window_partition(x, (ws, ws)).view(-1, ws * ws, C)
        windows = self.attn(windows).view(-1, ws, ws, C)
        x = window_reverse(windows, (ws, ws), Hp, Wp)
        return x[:, :H, :W, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x)
        x = x + self.drop_path1(self._window_attn(self.norm1(x)))
        x = self.cpe2(x)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class LinearGlobalBlock(nn.Module):
    """LGA block: CPE, linear global attention, LCM (pre-norm ``norm3``), MLP; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            cpe_act: bool = False,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.cpe1 = ConvPosEnc(dim, act=cpe_act, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = LinearGlobalAttention(dim, num_heads, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm3 = nn.LayerNorm(dim, **dd)
        self.lcm = LocalConcentration(dim, **dd)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x)
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.attn(self.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C))
        x = x + self.drop_path3(self.lcm(self.norm3(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class L2ViTStage(nn.Module):
    """Optional pre-norm downsampler, then blocks alternating LWA (even index) and LGA (odd index)."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            window_size: int = 7,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            cpe_act: bool = False,
            proj_drop: float = 0.,
            drop_path: Union[float, Sequence[float]] = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PreNormDownsample(dim, out_dim, **dd) if downsample else nn.Identity()
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        blocks = []
        for j in range(depth):
            common = dict(mlp_ratio=mlp_ratio, cpe_act=cpe_act, proj_drop=proj_drop, drop_path=drop_path[j], **dd)
            if j % 2 == 0:
                blocks.append(LocalWindowBlock(out_dim, num_heads, window_size=window_size, **common))
            else:
                blocks.append(LinearGlobalBlock(out_dim, num_heads, **common))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class L2ViT(nn.Module):
    """L²ViT, `The Linear Attention Resurrection in Vision Transformer` (https://arxiv.org/abs/2501.16182).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: ``'avg'`` or ``''``.
        dims: channels per stage.
        depths: blocks per stage (LWA and LGA alternate, LWA first).
        num_heads: heads per stage (window and linear attention alike).
        window_size: LWA window (7; 12 for the 384 model).
        mlp_ratio: MLP hidden width over block width, one value or one per stage.
        cpe_act: GELU after the CPE convs (off in every released model).
        drop_rate, proj_drop_rate, drop_path_rate: head dropout, projection dropout, stochastic depth.
        head_init_scale: factor on the initial classifier weights and bias.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Tuple[int, ...] = (96, 192, 384, 768),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: Union[float, Sequence[float]] = 4.,
            cpe_act: bool = False,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            head_init_scale: float = 1.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(dims) != num_stages or len(num_heads) != num_stages:
            raise ValueError(f"dims ({len(dims)}), depths ({num_stages}) and num_heads ({len(num_heads)}) "
                             f"must give one value per stage")
        mlp_ratios = list(mlp_ratio) if isinstance(mlp_ratio, (list, tuple)) else [mlp_ratio] * num_stages
        if len(mlp_ratios) != num_stages:
            raise ValueError(f"mlp_ratio must be one value or one per stage ({num_stages}), got {len(mlp_ratios)}")
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        for d, h in zip(dims, num_heads):
            if d % h:
                raise ValueError(f"every stage width must be divisible by its num_heads, got dims={tuple(dims)}, "
                                 f"num_heads={tuple(num_heads)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.window_size = window_size
        self.output_fmt = 'NHWC'

        self.stem = ConvStem(in_chans, dims[0], **dd)
        dp_rates = calculate_drop_path_rates(drop_path_rate, depths)
        self.feature_info = []
        stages = []
        prev_dim = dims[0]
        for i in range(num_stages):
            stages.append(L2ViTStage(
                prev_dim, dims[i], depths[i], num_heads[i], window_size=window_size, downsample=i > 0,
                mlp_ratio=mlp_ratios[i], cpe_act=cpe_act, proj_drop=proj_drop_rate, drop_path=dp_rates[i], **dd))
            prev_dim = dims[i]
            self.feature_info += [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev_dim
        self.norm = nn.LayerNorm(prev_dim, **dd)
        self.head = ClassifierHead(prev_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC', **dd)
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    def _init_weights(self, m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        # the original recipe decays everything but 1-D tensors (which timm's optimizer factory also skips);
        # the (heads, 1, 1) temperatures are decayed
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
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an original release file (or a state_dict file in either layout).

        The release files pickle an ``argparse.Namespace`` next to the weights, which timm's default
        ``weights_only`` loader refuses; the pretrained cfgs set ``custom_load`` so that timm calls this.
        A classifier whose shape differs from this model's (other ``num_classes``) is left initialised.
        """
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

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


_STEM_KEYS = {'proj.proj.0': 'conv1', 'proj.proj.1': 'bn1', 'proj.proj.3': 'conv2', 'proj.proj.4': 'bn2',
              'norm': 'norm'}


def remap_official_key(key: str) -> str:
    """Key of the original L2ViT state_dict -> key of :class:`L2ViT`."""
    parts = key.split('.')
    if parts[0] == 'downsample_layers':
        level, rest = int(parts[1]), '.'.join(parts[2:])
        if level == 0:
            for old, new in _STEM_KEYS.items():
                if rest.startswith(old + '.'):
                    return f'stem.{new}{rest[len(old):]}'
            return key
        name = {'proj': 'conv', 'norm': 'norm'}.get(parts[2], parts[2])
        return f"stages.{level}.downsample.{name}.{'.'.join(parts[3:])}"
    if parts[0] == 'stages' and len(parts) > 3:
        stage, block, rest = parts[1], parts[2], parts[3:]
        if rest[0] == 'cpe':
            rest = [f'cpe{int(rest[1]) + 1}'] + rest[2:]
        elif rest[0] == 'local_mp':
            rest = ['lcm'] + rest[1:]
        return f"stages.{stage}.blocks.{block}.{'.'.join(rest)}"
    if parts[0] == 'head':
        return 'head.fc.' + '.'.join(parts[1:])
    return key


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: L2ViT) -> Dict[str, torch.Tensor]:
    """Convert an original L2ViT checkpoint to this model's layout.

    Accepts a bare state_dict or the training dict of the original code. From a training dict the
    ``model`` weights are taken (the ones the original evaluation loads and reports accuracy with);
    ``model_ema`` only when there is no ``model``.
    """
    for wrapper in ('model', 'model_ema', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'stem.conv1.weight' in state_dict:
        return state_dict
    return {remap_official_key(k): v for k, v in state_dict.items()}


# arguments of the original L2ViT constructor with their defaults there
_OFFICIAL_DEFAULTS = dict(
    in_chans=3, num_classes=1000, mlp_ratio=(4., 4., 4., 4.), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
    dims=(96, 192, 384, 768), drop_path_rate=0., layer_scale_init_value=1e-6, head_init_scale=1., cpe=False,
    sub_cpe=False, cpe_kernel=3, cpe_act=False, conv_stem=False, conv_stem_type='2L', stem_overlapped=False,
    overlapped=False, ffn_conv=False, rffn_conv=False, window_size=7, token_mixer='csmix', channel_mixer='mlp',
    block_type='convnext', norm={'type': 'LN'}, last_proj=False,
)
# accepted and not used by the original blocks (they take these as **kwargs and drop them)
_OFFICIAL_IGNORED = ('layer_scale_init_value', 'cpe', 'sub_cpe', 'cpe_kernel', 'ffn_conv', 'rffn_conv',
                     'token_mixer', 'channel_mixer')
# the configuration of every released model; other values select ablation code paths not ported here
_OFFICIAL_FIXED = dict(conv_stem=True, conv_stem_type='2L', overlapped=False, block_type='mix_local_enhanced_vit',
                       norm={'type': 'LN'}, last_proj=False)


def convert_official(official_class: str, official_kwargs: Dict[str, Any]):
    """``(model_class, model_kwargs, checkpoint_filter_fn)`` equivalent to the original
    ``classification/models/l2vit.py:L2ViT(**official_kwargs)``."""
    # 'path.py:L2ViT', or as the manifests write it, 'path.py: L2ViT (blocks: ...)'
    cls_name = official_class.split(':', 1)[-1].strip().split(' ', 1)[0].rsplit('.', 1)[-1]
    if cls_name not in ('L2ViT', 'L2ViT_Tiny', 'L2ViT_Small', 'L2ViT_Base', 'L2ViT_Base_384'):
        raise ValueError(f"official_class for l2vit must be classification/models/l2vit.py:L2ViT, "
                         f"got {official_class!r}")
    unknown = sorted(set(official_kwargs) - set(_OFFICIAL_DEFAULTS))
    if unknown:
        raise ValueError(f"official_kwargs for 'l2vit' has arguments visionmix does not know: {unknown}; "
                         f"known: {sorted(_OFFICIAL_DEFAULTS)}")
    kw = {**_OFFICIAL_DEFAULTS, **official_kwargs}
    for name, value in _OFFICIAL_FIXED.items():
        if kw[name] != value:
            raise ValueError(f"official_kwargs {name}={kw[name]!r} is not supported: every released L2ViT uses "
                             f"{name}={value!r}")
    if len(kw['depths']) != 4:
        raise ValueError(f"the original L2ViT has 4 stages: depths must have 4 values, got {kw['depths']!r}")
    model_kwargs = dict(
        in_chans=kw['in_chans'], num_classes=kw['num_classes'], dims=tuple(kw['dims']), depths=tuple(kw['depths']),
        num_heads=tuple(kw['num_heads']), window_size=kw['window_size'], mlp_ratio=tuple(kw['mlp_ratio']),
        cpe_act=bool(kw['cpe_act']), drop_path_rate=kw['drop_path_rate'], head_init_scale=kw['head_init_scale'])
    return L2ViT, model_kwargs, checkpoint_filter_fn


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc', 'license': 'mit', 'custom_load': True,
        'paper_ids': 'arXiv:2501.16182', 'paper_name': 'The Linear Attention Resurrection in Vision Transformer',
        'origin_url': 'https://github.com/ChuanyangZheng/L2ViT',
        **kwargs,
    }


_URL = 'https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/'

default_cfgs = generate_default_cfgs({
    'l2vit_tiny.in1k': _cfg(url=_URL + 'L2ViT-Tiny-checkpoint-best-ema.pth'),
    'l2vit_small.in1k': _cfg(url=_URL + 'L2ViT-Small-checkpoint-best-ema.pth'),
    'l2vit_base.in22k_ft_in1k': _cfg(url=_URL + 'L2ViT-Base-22k21k-finetune-224-checkpoint-best.pth'),
    'l2vit_base.in1k': _cfg(url=_URL + 'L2ViT-Base-checkpoint-best-ema.pth'),
    # 21841 classes in the authors' own ImageNet-22k class order
    'l2vit_base.in22k': _cfg(url=_URL + 'L2ViT-Base-22k-pretrain-checkpoint-best.pth', num_classes=21841),
    'l2vit_base_384.in22k_ft_in1k': _cfg(
        url=_URL + 'L2ViT-Base-22k21k-finetune-384-checkpoint-best.pth', input_size=(3, 384, 384),
        pool_size=(12, 12), crop_pct=1.0, crop_mode='squash'),
    'test_l2vit': _cfg(input_size=(3, 64, 64), min_input_size=(3, 32, 32), pool_size=(2, 2), license='apache-2.0',
                       custom_load=False),
})


def _create_l2vit(variant: str, pretrained: bool = False, **kwargs) -> L2ViT:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 6, 2))))))
    return build_model_with_cfg(
        L2ViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


@register_model
def l2vit_tiny(pretrained=False, **kwargs) -> L2ViT:
    model_args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_l2vit('l2vit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_small(pretrained=False, **kwargs) -> L2ViT:
    model_args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_l2vit('l2vit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_base(pretrained=False, **kwargs) -> L2ViT:
    model_args = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_l2vit('l2vit_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_base_384(pretrained=False, **kwargs) -> L2ViT:
    model_args = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)
    return _create_l2vit('l2vit_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_l2vit(pretrained=False, **kwargs) -> L2ViT:
    model_args = dict(dims=(24, 48, 72, 96), depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), mlp_ratio=2.,
                      drop_path_rate=0.1)
    return _create_l2vit('test_l2vit', pretrained=pretrained, **dict(model_args, **kwargs))
