"""VCMamba: a convolutional network whose last blocks are multi-directional Mamba (selective-scan) blocks.

Paper: `VCMamba: Bridging Convolutions with Multi-Directional Mamba for Efficient Visual Representation`
(M. Munir, A. Zhang, R. Marculescu, ICCV 2025 Workshops) - https://arxiv.org/abs/2509.04669
Original code: https://github.com/Wertyuui345/VCMamba (classification model ``model/mambacnn.py:EfficientFormer``,
Mamba blocks ``model/plain_mamba_layer.py``); weights: https://huggingface.co/SLDGroup/VCMamba

The network is EfficientFormer-V2-like and channels-first (NCHW) throughout: a two-conv ReLU stem (stride 4),
four stages of conv FFN blocks (1x1 conv, BN, GELU, depthwise 3x3, BN, GELU, 1x1 conv, BN, with layer scale) joined
by 3x3 stride-2 conv + BN downsamplers; in stage 4 an absolute position embedding is added once, after the FFN
blocks, and the last ``num_mamba`` blocks are Mamba blocks: ``x + mixer(BN(x))`` then ``x + mlp(BN(x))``, with a
PlainMamba-style 2-D mixer (1x1 conv + BN to ``2C`` channels, depthwise 7x7 conv + SiLU, ``x_proj`` / ``dt_proj``,
a selective scan along four snake orders, LayerNorm, ReLU, 1x1 conv, BN). The head applies LayerNorm to every
token, averages, and classifies.

Quirks of the original that the released weights depend on, all reproduced:

* only the scan input ``u`` is reordered per direction; ``delta``, ``B`` and ``C`` stay in raster order, so scan
  step ``t`` pairs the token ``orders[k, t]`` with the delta/B/C computed at raster position ``t``;
* ``dt_proj.bias`` counts twice: once in the Linear and again as the scan's ``delta_bias``;
* the skip term ``D * u`` is added in each of the four directions (``4 D u`` in total); there is no output gate;
* the four orders are the row snake from the top-left corner, its exact reverse, the column snake from the top-left
  corner and its exact reverse (the reverse scans start at a corner that depends on the parity of H or W); every
  step adds a learned vector ``direction_Bs[code]`` to ``B``, where ``code`` is the move that reached the step
  (0 start, 1 right, 2 left, 3 up, 4 down); the four outputs are put back in raster order and summed.

Differences from the original code:

* timm layout: ``stem``, ``stages.{i}`` (the downsampler of stage ``i`` starts ``stages.{i}``; stage 4 holds the
  position embedding ``stages.3.pos_embed`` and its blocks, FFN then Mamba, as ``stages.3.blocks.{j}``), ``norm``
  (LayerNorm over channels of the NCHW map) and ``head.fc``; the Mamba block's pre-norm is ``norm1``, its mixer
  ``mixer``, and the FFN layer scale is ``layer_scale`` of shape ``(C,)``; ``checkpoint_filter_fn`` moves the keys;
* the original's two classifiers ``head`` and ``dist_head`` (DeiT distillation) are folded into one: in eval mode
  the original returns their mean, which is one Linear layer with the averaged weights and biases. The train-mode
  pair of outputs (for distillation training) is not reproduced;
* any input size works: when the stage-4 grid differs from the stored position-embedding grid, the embedding is
  resized (bicubic) to the grid in the forward pass, and ``checkpoint_filter_fn`` resizes a stored embedding of
  another grid to the model's (``img_size``). The original only runs at its training resolution. Its segmentation
  backbone loads the 7x7 ImageNet embedding into a 16x16 grid by reshaping the ``(1, C, 7, 7)`` tensor as
  ``(1, 7, 7, C)`` (a memory reinterpretation, not a permute) before resizing, which scrambles channels and
  positions; that is not reproduced;
* the scan order and direction-code tables are built once per grid size and device and cached.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerNorm2d,
    calculate_drop_path_rates,
    get_device_dtype,
    lecun_normal_,
    register_notrace_function,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.kernels.selective_scan import selective_scan_multidir

__all__ = ['VCMamba', 'scan_orders', 'scan_tables', 'resample_pos_embed']

NUM_DIRECTIONS = 4
NUM_CODES = 5  # start, right, left, up, down


def scan_orders(height: int, width: int, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The four snake scan orders of an ``height x width`` raster and their direction codes, each ``[4, H*W]``.

    ``orders[k, t]`` is the raster index (``i * W + j``) visited at step ``t`` of direction ``k``:
    0 row snake from (0, 0) (row 0 left to right, row 1 right to left, ...), 1 its exact reverse, 2 column snake
    from (0, 0) (column 0 top to bottom, column 1 bottom to top, ...), 3 its exact reverse.
    ``codes[k, t]`` is the move that reached step ``t``: 0 at ``t = 0``, then 1 right, 2 left, 3 up, 4 down.
    """
    if height < 1 or width < 1:
        raise ValueError(f"the scan grid must be at least 1x1, got {height}x{width}")
    grid = torch.arange(height * width, device=device).reshape(height, width)
    rows = grid.clone()
    rows[1::2] = rows[1::2].flip(-1)
    cols = grid.t().contiguous()
    cols[1::2] = cols[1::2].flip(-1)
    row_snake, col_snake = rows.flatten(), cols.flatten()
    orders = torch.stack([row_snake, row_snake.flip(0), col_snake, col_snake.flip(0)])
    d_row = torch.diff(orders // width, dim=1)
    d_col = torch.diff(orders % width, dim=1)
    moves = torch.where(d_col == 1, 1, torch.where(d_col == -1, 2, torch.where(d_row == -1, 3, 4)))
    codes = torch.cat([torch.zeros_like(orders[:, :1]), moves], dim=1)
    return orders, codes


_SCAN_TABLES: Dict[Tuple[int, int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}


def scan_tables(height: int, width: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`scan_orders`, built once per ``(height, width, device)`` and cached."""
    if torch.compiler.is_compiling():
        return scan_orders(height, width, device)
    key = (height, width, torch.device(device))
    tables = _SCAN_TABLES.get(key)
    if tables is None:
        # plain tensors even when first built under inference_mode (they are indices saved for backward later)
        with torch.inference_mode(False), torch.no_grad():
            tables = scan_orders(height, width, device)
        _SCAN_TABLES[key] = tables
    return tables


@register_notrace_function  # builds its tables from the token-map size
@torch.jit.ignore
def multidir_scan(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        delta_bias: Optional[torch.Tensor],
        direction_Bs: torch.Tensor,
        height: int,
        width: int,
) -> torch.Tensor:
    """VCMamba's four-direction selective scan of ``u`` ``[batch, E, H*W]`` (raster order), summed in raster order.

    ``delta`` ``[batch, E, L]`` and ``B``/``C`` ``[batch, N, L]`` are read at the step index (not reordered), the
    direction vector of each step's move is added to ``B``, and ``delta_bias`` is added before the softplus.
    """
    orders, codes = scan_tables(height, width, u.device)
    b_bias = direction_Bs[codes].transpose(-1, -2)  # [4, N, L]
    return selective_scan_multidir(
        u, delta, A, B, C, orders, D=D, delta_bias=delta_bias, delta_softplus=True, B_bias=b_bias,
        permute_params=False, validate_orders=False)


def resample_pos_embed(pos_embed: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Resize an NCHW position embedding ``(1, C, h, w)`` to ``size`` = ``[H, W]`` (bicubic, antialiased when
    shrinking); half-precision tables are resized in float32."""
    if pos_embed.shape[-2] == size[0] and pos_embed.shape[-1] == size[1]:
        return pos_embed
    orig_dtype = pos_embed.dtype
    if orig_dtype == torch.float16 or orig_dtype == torch.bfloat16:
        pos_embed = pos_embed.float()
    out = F.interpolate(pos_embed, size=size, mode='bicubic', align_corners=False, antialias=True)
    return out.to(orig_dtype)


@register_notrace_function  # reads the feature-map size
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """``x + pos_embed``, the embedding resized to ``x``'s grid when the grids differ."""
    return x + resample_pos_embed(pos_embed, [x.shape[-2], x.shape[-1]])


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"input must be an NCHW image batch, got shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input must have in_chans={in_chans} channels (NCHW), got shape {list(x.shape)}")
    return x


class ConvMlp(nn.Module):
    """1x1 conv + BN, GELU, depthwise 3x3 conv + BN, GELU, dropout, 1x1 conv + BN, dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.norm1 = nn.BatchNorm2d(hidden_dim, **dd)
        self.act = nn.GELU()
        self.mid = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.mid_norm = nn.BatchNorm2d(hidden_dim, **dd)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def init_weights(self):
        for conv in (self.fc1, self.fc2):
            trunc_normal_(conv.weight, std=.02)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.drop1(self.act(self.mid_norm(self.mid(x))))
        return self.drop2(self.norm2(self.fc2(x)))


class ConvBlock(nn.Module):
    """``x + drop_path(layer_scale * mlp(x))``: EfficientFormer-V2's FFN block (no token mixer)."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-5,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.ls_init_value = ls_init_value
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        if ls_init_value is not None:
            self.layer_scale = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.register_parameter('layer_scale', None)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def init_weights(self):
        if self.layer_scale is not None:
            nn.init.constant_(self.layer_scale, self.ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        if self.layer_scale is not None:
            y = y * self.layer_scale.view(-1, 1, 1)
        return x + self.drop_path(y)


class PlainMamba2D(nn.Module):
    """VCMamba's 2-D Mamba mixer on an NCHW map (see the module docstring for the scan's quirks).

    ``in_conv`` (1x1 conv + BN, ``C -> E = expand * C``), depthwise ``conv_size`` conv + SiLU, then per token
    ``x_proj`` to ``(dt_rank, N, N)``, ``delta = dt_proj(dt)``; the four-direction selective scan with
    ``A = -exp(A_log)``, ``D`` and ``direction_Bs``; LayerNorm over E, then ``out_conv`` (ReLU, 1x1 conv, BN).
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            expand: int = 2,
            conv_size: int = 7,
            dt_rank: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f"conv_size must be odd, got {conv_size}")
        inner = int(expand * dim)
        self.d_state = d_state
        self.d_inner = inner
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_conv = nn.Sequential(nn.Conv2d(dim, inner, 1, **dd), nn.BatchNorm2d(inner, **dd))
        self.conv2d = nn.Conv2d(inner, inner, conv_size, padding=conv_size // 2, groups=inner, **dd)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, inner, **dd)
        self.A_log = nn.Parameter(torch.empty(inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(inner, **dd))
        self.direction_Bs = nn.Parameter(torch.empty(NUM_CODES, d_state, **dd))
        self.norm = nn.LayerNorm(inner, **dd)
        self.out_conv = nn.Sequential(nn.ReLU(), nn.Conv2d(inner, dim, 1, **dd), nn.BatchNorm2d(dim, **dd))

    def init_weights(self):
        """S4D-real ``A = -(1..N)``, ``D = 1``, ``direction_Bs`` ~ trunc_normal(0.02); the model re-initialises the
        Linear layers (``x_proj``, ``dt_proj``) to trunc_normal(0.02) with zero bias, as the original does."""
        with torch.no_grad():
            n = torch.arange(1, self.d_state + 1, device=self.A_log.device, dtype=torch.float32)
            self.A_log.copy_(torch.log(n).expand_as(self.A_log))
        nn.init.ones_(self.D)
        trunc_normal_(self.direction_Bs, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        x = self.act(self.conv2d(self.in_conv(x)))
        u = x.flatten(2)  # [B, E, L], raster order
        x_dbl = self.x_proj(u.transpose(1, 2))  # [B, L, R + 2N]
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)  # [B, E, L], dt_proj.bias included
        A = -torch.exp(self.A_log)
        y = multidir_scan(u, delta, A, b.transpose(1, 2), c.transpose(1, 2), self.D, self.dt_proj.bias,
                          self.direction_Bs, height, width)
        y = self.norm(y.transpose(1, 2)).transpose(1, 2).reshape(batch, self.d_inner, height, width)
        return self.out_conv(y)


class MambaBlock(nn.Module):
    """``x + drop_path(mixer(BN(x)))``, then ``x + drop_path(mlp(BN(x)))``; no layer scale."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            d_state: int = 16,
            expand: int = 2,
            conv_size: int = 7,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.mixer = PlainMamba2D(dim, d_state=d_state, expand=expand, conv_size=conv_size, **dd)
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """3x3 stride-2 conv (with bias), then BatchNorm."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, **dd)
        self.norm = nn.BatchNorm2d(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class VCMambaStage(nn.Module):
    """Optional downsampler, FFN blocks, then (when ``num_mamba > 0``) the position embedding and Mamba blocks."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_mamba: int = 0,
            downsample: bool = True,
            pos_embed_grid: Optional[Tuple[int, int]] = None,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-5,
            d_state: int = 16,
            expand: int = 2,
            conv_size: int = 7,
            proj_drop: float = 0.,
            pos_drop: float = 0.,
            drop_path: Sequence[float] = (),
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if not 0 <= num_mamba <= depth:
            raise ValueError(f"num_mamba ({num_mamba}) must be between 0 and the stage depth ({depth})")
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim, **dd) if downsample else nn.Identity()
        self.mamba_start = depth - num_mamba
        if pos_embed_grid is not None:
            self.pos_embed = nn.Parameter(torch.empty(1, out_dim, pos_embed_grid[0], pos_embed_grid[1], **dd))
        else:
            self.register_parameter('pos_embed', None)
        self.pos_drop = nn.Dropout(pos_drop)
        drop_path = list(drop_path) or [0.] * depth
        blocks: List[nn.Module] = []
        for i in range(depth):
            if i < self.mamba_start:
                blocks.append(ConvBlock(out_dim, mlp_ratio, ls_init_value, proj_drop=proj_drop,
                                        drop_path=drop_path[i], **dd))
            else:
                blocks.append(MambaBlock(out_dim, mlp_ratio, d_state=d_state, expand=expand, conv_size=conv_size,
                                         proj_drop=proj_drop, drop_path=drop_path[i], **dd))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for i, blk in enumerate(self.blocks):
            if i == self.mamba_start and self.pos_embed is not None:
                x = self.pos_drop(add_pos_embed(x, self.pos_embed))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


def _grid(img_size: Tuple[int, int], stride: int) -> Tuple[int, int]:
    # every stride-2 conv (k3, p1) gives ceil(n / 2); nested ceilings compose
    return -(-img_size[0] // stride), -(-img_size[1] // stride)


class VCMamba(nn.Module):
    """VCMamba (https://arxiv.org/abs/2509.04669): conv FFN stages, Mamba blocks at the end of the last stage.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: ``'avg'`` (the original's token mean) or ``''``.
        embed_dims: channels per stage.
        depths: blocks per stage, Mamba blocks included.
        num_mamba: how many of the last stage's blocks are Mamba blocks (the others are FFN blocks).
        mlp_ratio: hidden width of every conv MLP over its block width.
        ls_init_value: initial FFN layer scale (None: no layer scale).
        img_size: input size the position embedding is stored for (its grid is ``ceil(img_size / 32)``); other
            sizes resize it in the forward pass.
        abs_pos_embed: add a learned position embedding before the first Mamba block.
        d_state, expand, conv_size: Mamba state size N, inner width factor, depthwise conv size.
        drop_rate: dropout before the classifier. pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout in the conv MLPs. drop_path_rate: stochastic depth, linear over all blocks.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (4, 4, 12, 6),
            num_mamba: int = 4,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-5,
            img_size: Union[int, Tuple[int, int]] = 224,
            abs_pos_embed: bool = True,
            d_state: int = 16,
            expand: int = 2,
            conv_size: int = 7,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(embed_dims) != num_stages:
            raise ValueError(f"embed_dims must give one width per stage ({num_stages}), got {len(embed_dims)}")
        if embed_dims[0] % 2:
            raise ValueError(f"embed_dims[0] must be even (the stem's first conv uses half of it), got {embed_dims[0]}")
        if not 0 <= num_mamba <= depths[-1]:
            raise ValueError(f"num_mamba ({num_mamba}) must be between 0 and the last stage's depth ({depths[-1]})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = 'NCHW'
        self.img_size = to_2tuple(img_size)
        self.stride = 2 ** (num_stages + 1)
        grid = _grid(self.img_size, self.stride) if abs_pos_embed and num_mamba > 0 else None

        stem_dim = embed_dims[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(stem_dim, **dd),
            nn.ReLU(),
            nn.Conv2d(stem_dim, embed_dims[0], 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0], **dd),
            nn.ReLU(),
        )
        # linear in the block index over the whole network (Mamba blocks included), split per stage
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        prev_dim = embed_dims[0]
        for i in range(num_stages):
            last = i == num_stages - 1
            stages.append(VCMambaStage(
                prev_dim, embed_dims[i], depths[i], num_mamba=num_mamba if last else 0, downsample=i > 0,
                pos_embed_grid=grid if last else None, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value,
                d_state=d_state, expand=expand, conv_size=conv_size, proj_drop=proj_drop_rate,
                pos_drop=pos_drop_rate, drop_path=dp_rates[i], **dd))
            prev_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=prev_dim, reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_dim
        self.norm = LayerNorm2d(prev_dim, eps=1e-5, **dd)  # per token, before pooling
        self.head = ClassifierHead(prev_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    def _init_weights(self, m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            m.reset_parameters()
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            m.reset_parameters()
        elif isinstance(m, (ConvMlp, ConvBlock, PlainMamba2D)):
            m.init_weights()  # runs after its children (module.apply is post-order)

    def init_weights(self):
        """As the original: every Linear trunc_normal(0.02) with zero bias (the mixer's dt init is overwritten by
        this in the original too), MLP 1x1 convs trunc_normal(0.02) with zero bias, stem convs lecun_normal with
        zero bias, other convs PyTorch's default, norms 1/0, ``A_log = log(1..N)``, ``D = 1``,
        ``direction_Bs`` and ``pos_embed`` trunc_normal(0.02), layer scale ``ls_init_value``."""
        self.apply(self._init_weights)
        for m in self.stem:
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        """Position embedding, ``A_log`` and ``direction_Bs`` (timm's ViT / Mamba conventions); biases, norms,
        ``D`` and the layer scales are 1-D and excluded by timm's optimizer factory anyway."""
        return {n for n, _ in self.named_parameters() if n.endswith(('pos_embed', '.A_log', '.direction_Bs'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.pos_embed', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Store the position embedding for another input size (resized now; other sizes still work)."""
        self.img_size = to_2tuple(img_size)
        grid = _grid(self.img_size, self.stride)
        for stage in self.stages:
            if stage.pos_embed is not None:
                old = stage.pos_embed
                with torch.no_grad():
                    new = resample_pos_embed(old.detach(), list(grid))
                stage.pos_embed = nn.Parameter(new, requires_grad=old.requires_grad)

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
            norm: apply the head's LayerNorm to the last stage's output when it is taken.
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
        """Drop the stages not needed for ``indices`` (a pruned last stage takes its position embedding along);
        with the norm pruned (or fewer stages kept) the head LayerNorm goes too, so features end at the last tap."""
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


def remap_official_key(key: str) -> str:
    """Key of the original ``EfficientFormer`` (VCMamba) state_dict -> key of :class:`VCMamba`.

    ``network`` holds ``[stage1, down, stage2, down, stage3, down, stage4]``; the position embedding belongs to the
    last stage (index 3 in every model the original can build).
    """
    parts = key.split('.')
    if parts[0] == 'patch_embed':
        return 'stem.' + '.'.join(parts[1:])
    if parts[0] == 'pos_embed':
        return 'stages.3.pos_embed'
    if parts[0] == 'network':
        index = int(parts[1])
        if index % 2:  # downsampler between stages (index - 1) // 2 and (index + 1) // 2
            name = {'proj': 'conv'}.get(parts[2], parts[2])
            return f"stages.{(index + 1) // 2}.downsample.{name}.{'.'.join(parts[3:])}"
        rest = parts[3:]
        if rest[0] == 'layer_scale_2':
            rest = ['layer_scale'] + rest[1:]
        elif rest[0] == 'norm':  # Mamba block pre-norm (the mixer's LayerNorm is 'mamba.norm')
            rest = ['norm1'] + rest[1:]
        elif rest[0] == 'mamba':
            rest = ['mixer'] + rest[1:]
        return f"stages.{index // 2}.blocks.{parts[2]}.{'.'.join(rest)}"
    if parts[0] == 'head':
        return 'head.fc.' + '.'.join(parts[1:])
    return key


def checkpoint_filter_fn(state_dict, model: VCMamba):
    """Convert a released VCMamba checkpoint (a bare state_dict, or the training dict with the weights under
    ``'model'``; ``model_ema`` is not used when ``model`` is present) to this model's layout.

    ``head`` and ``dist_head`` are folded into one classifier with the mean weight and bias (the original's eval
    output); the position embedding is resized to the model's grid when it was stored for another one; a
    classifier is dropped when the model has none (``num_classes=0``).
    """
    for wrapper in ('model', 'state_dict', 'model_ema'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'stem.0.weight' not in state_dict:
        dist = {k.split('.', 1)[1]: state_dict[k] for k in state_dict if k.startswith('dist_head.')}
        out = {}
        for key, value in state_dict.items():
            if key.startswith('dist_head.'):
                continue
            new_key = remap_official_key(key)
            if new_key.endswith('.layer_scale'):
                value = value.reshape(-1)  # (C, 1, 1) -> (C,)
            out[new_key] = value
        for name, value in dist.items():
            key = f'head.fc.{name}'
            if key not in out:
                raise ValueError(f"checkpoint has dist_head.{name} but no head.{name}")
            if out[key].shape != value.shape:
                raise ValueError(f"head.{name} {tuple(out[key].shape)} and dist_head.{name} {tuple(value.shape)} "
                                 f"differ in shape")
            out[key] = (out[key] + value) / 2
        state_dict = out
    own = model.state_dict()
    for key, value in list(state_dict.items()):
        if key.endswith('pos_embed') and key in own and value.ndim == 4 and own[key].ndim == 4 \
                and value.shape[-2:] != own[key].shape[-2:]:
            state_dict[key] = resample_pos_embed(value, list(own[key].shape[-2:]))
    if 'head.fc.weight' not in own:  # no classifier (num_classes=0)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.fc.')}
    return state_dict


_OFFICIAL_KWARGS = (
    'layers', 'embed_dims', 'mlp_ratios', 'downsamples', 'pool_size', 'norm_layer', 'act_layer', 'num_classes',
    'down_patch_size', 'down_stride', 'down_pad', 'drop_rate', 'drop_path_rate', 'use_layer_scale',
    'layer_scale_init_value', 'resolution', 'fork_feat', 'init_cfg', 'pretrained', 'vit_num', 'distillation',
    'device', 'dtype', 'if_abs_pos_embed',
)


def _is_class(value, cls, name: str) -> bool:
    return value is cls or value == name or getattr(value, '__name__', None) == name


def convert_official(official_class: str, official_kwargs: dict):
    """``(model_class, model_kwargs, checkpoint_filter_fn)`` equivalent to the original VCMamba constructor
    ``model/mambacnn.py:EfficientFormer(**official_kwargs)``.

    The original's defaults apply to arguments not given (``if_abs_pos_embed=False``, ``drop_path_rate=0.2``,
    ``distillation=True``, ``resolution=224``); ``layers``, ``embed_dims``, ``downsamples`` and ``vit_num`` must be
    given (the original fails without them or, for ``vit_num=0``, builds no Mamba block). ``distillation`` only
    decides whether the checkpoint holds a ``dist_head`` (folded into the classifier by ``checkpoint_filter_fn``).
    """
    path, _, cls_name = official_class.rpartition(':')
    cls_name = cls_name.rsplit('.', 1)[-1]
    if cls_name != 'EfficientFormer' or (path and not path.endswith('mambacnn.py')):
        raise ValueError(f"official_class for vcmamba must be model/mambacnn.py:EfficientFormer, "
                         f"got {official_class!r}")
    kwargs = dict(official_kwargs)
    unknown = sorted(set(kwargs) - set(_OFFICIAL_KWARGS))
    if unknown:
        raise ValueError(f"official_kwargs for VCMamba has arguments visionmix does not know: {unknown}; "
                         f"known: {sorted(_OFFICIAL_KWARGS)}")
    missing = [k for k in ('layers', 'embed_dims', 'downsamples', 'vit_num') if kwargs.get(k) is None]
    if missing:
        raise ValueError(f"official_kwargs for VCMamba must give {missing} (the original has no usable default)")
    layers, dims = [int(v) for v in kwargs['layers']], [int(v) for v in kwargs['embed_dims']]
    if len(layers) != 4 or len(dims) != 4:
        raise ValueError(f"layers and embed_dims must have 4 stages (the original puts its Mamba blocks in stage "
                         f"index 3), got {layers} and {dims}")
    if list(kwargs['downsamples']) != [True] * 4:
        raise ValueError(f"downsamples must be [True, True, True, True] (as every released model; other values change "
                         f"the position-embedding grid the original derives), got {kwargs['downsamples']!r}")
    vit_num = int(kwargs['vit_num'])
    if not 1 <= vit_num <= layers[3]:
        raise ValueError(f"vit_num must be between 1 and layers[3] ({layers[3]}), got {vit_num}")
    for name, default in (('down_patch_size', 3), ('down_stride', 2), ('down_pad', 1)):
        if kwargs.get(name, default) != default:
            raise ValueError(f"{name}={kwargs[name]!r} is not supported (only the original default {default})")
    if kwargs.get('fork_feat', False):
        raise ValueError('fork_feat=True (the dense-prediction backbone with per-output norms) is not supported; '
                         "use timm.create_model(..., features_only=True) for the stage outputs")
    for name in ('init_cfg', 'pretrained'):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is only used with fork_feat=True; load weights through state_dict instead")
    if not _is_class(kwargs.get('norm_layer', nn.LayerNorm), nn.LayerNorm, 'LayerNorm'):
        raise ValueError(f"norm_layer must be nn.LayerNorm (the head norm), got {kwargs['norm_layer']!r}")
    if not _is_class(kwargs.get('act_layer', nn.GELU), nn.GELU, 'GELU'):
        raise ValueError(f"act_layer must be nn.GELU, got {kwargs['act_layer']!r}")
    abs_pos_embed = bool(kwargs.get('if_abs_pos_embed', False))
    resolution = int(kwargs.get('resolution', 224))
    if abs_pos_embed and resolution // 32 < 1:
        raise ValueError(f"resolution must be at least 32 with if_abs_pos_embed=True (the original's position "
                         f"grid is resolution // 32), got {resolution}")
    use_ls = kwargs.get('use_layer_scale', True)
    drop_rate = float(kwargs.get('drop_rate', 0.))
    model_kwargs = dict(
        num_classes=int(kwargs.get('num_classes', 1000)),
        embed_dims=tuple(dims),
        depths=tuple(layers),
        num_mamba=vit_num,
        mlp_ratio=float(kwargs.get('mlp_ratios', 4)),
        ls_init_value=float(kwargs.get('layer_scale_init_value', 1e-5)) if use_ls else None,
        img_size=(resolution // 32) * 32 if abs_pos_embed else resolution,
        abs_pos_embed=abs_pos_embed,
        pos_drop_rate=drop_rate,
        proj_drop_rate=drop_rate,
        drop_path_rate=float(kwargs.get('drop_path_rate', 0.2)),
        device=kwargs.get('device'),
        dtype=kwargs.get('dtype'),
    )
    return VCMamba, model_kwargs, checkpoint_filter_fn


def _cfg(**kwargs):
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 32, 32), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc', 'license': 'unknown', 'custom_load': 'hf',
        **kwargs,
    }


_VCMAMBA = dict(
    hf_hub_id='SLDGroup/VCMamba', origin_url='https://github.com/Wertyuui345/VCMamba', paper_ids='arXiv:2509.04669',
    paper_name='VCMamba: Bridging Convolutions with Multi-Directional Mamba for Efficient Visual Representation')

default_cfgs = generate_default_cfgs({
    'vcmamba_small.in1k': _cfg(hf_hub_filename='VCMamba-S.pth', **_VCMAMBA),
    'vcmamba_medium.in1k': _cfg(hf_hub_filename='VCMamba-M.pth', **_VCMAMBA),
    'vcmamba_base.in1k': _cfg(hf_hub_filename='VCMamba-B.pth', **_VCMAMBA),
    'test_vcmamba': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_vcmamba(variant: str, pretrained: bool = False, **kwargs) -> VCMamba:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (4, 4, 12, 6))))))
    return build_model_with_cfg(
        VCMamba, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


_VARIANTS = {  # released S / M / B (the original factories VCMamba_EfficientFormer_{S,M,B})
    'small': dict(depths=(4, 4, 12, 8), embed_dims=(32, 64, 144, 288), num_mamba=4),
    'medium': dict(depths=(4, 4, 12, 6), embed_dims=(48, 96, 224, 448), num_mamba=4),
    'base': dict(depths=(4, 4, 12, 6), embed_dims=(64, 128, 320, 512), num_mamba=4),
}


@register_model
def vcmamba_small(pretrained=False, **kwargs) -> VCMamba:
    return _create_vcmamba('vcmamba_small', pretrained=pretrained, **dict(_VARIANTS['small'], **kwargs))


@register_model
def vcmamba_medium(pretrained=False, **kwargs) -> VCMamba:
    return _create_vcmamba('vcmamba_medium', pretrained=pretrained, **dict(_VARIANTS['medium'], **kwargs))


@register_model
def vcmamba_base(pretrained=False, **kwargs) -> VCMamba:
    return _create_vcmamba('vcmamba_base', pretrained=pretrained, **dict(_VARIANTS['base'], **kwargs))


@register_model
def test_vcmamba(pretrained=False, **kwargs) -> VCMamba:
    args = dict(depths=(1, 1, 1, 3), embed_dims=(8, 12, 16, 24), num_mamba=2, img_size=64)
    return _create_vcmamba('test_vcmamba', pretrained=pretrained, **dict(args, **kwargs))
