"""visionmix models as mmsegmentation backbones.

Each family is registered in mmseg's ``MODELS`` registry under ``<Family>Backbone``. All of them are the same
wrapper around ``timm.create_model(name, features_only=True)``; a family fixes which model names it accepts and the
output norms its original dense-prediction backbone adds (NAT, L2ViT, MAViT/RAVLT and BiFormer normalise each output
map with a fresh LayerNorm; VCMamba and PVT return the stage outputs as they are). Pretrained weights come through
timm's pretrained cfgs (``pretrained=True``) or a local release file (``checkpoint``), with the same converters as
classification, so mmseg's ``init_cfg`` checkpoint loading is not used.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn

from visionmix.adapters.swap import GratViTAttention, set_grat_grid

__all__ = ['TimmFeatureBackbone', 'FAMILY_BACKBONES']


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimmFeatureBackbone(BaseModule):
    """Any timm model (visionmix's included) as an mmseg backbone returning NCHW maps.

    Args:
        model_name: timm model name, optionally with a pretrained tag (``'nat_tiny.in1k'``).
        pretrained: load the model's released ImageNet weights through its pretrained cfg.
        checkpoint: path of a local weights file in any layout the model's loader accepts (a release file or a
            converted state_dict); implies ``pretrained``.
        out_indices: feature levels to return (stage indices; block indices for plain ViTs).
        out_norm: True adds a LayerNorm per returned map (over channels), as the original dense backbones of
            several families do; these norms start from their default init.
        norm_eps: eps of those LayerNorms.
        size_divisor: zero-pad the input at the bottom/right to a multiple of this before the model and crop every
            map back to ``ceil(size / stride)``; for models whose windows or patches need divisible inputs.
        drop_path_rate: stochastic depth of the model.
        model_kwargs: further keyword arguments of the model (``img_size``, ``n_win``, ``dilations``, ...).
    """
    model_prefixes: Tuple[str, ...] = ()
    default_out_norm = False
    default_norm_eps = 1e-6

    def __init__(
            self,
            model_name: str,
            pretrained: bool = False,
            checkpoint: Optional[str] = None,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            out_norm: Optional[bool] = None,
            norm_eps: Optional[float] = None,
            size_divisor: Optional[int] = None,
            drop_path_rate: float = 0.0,
            model_kwargs: Optional[Dict] = None,
            init_cfg=None,
    ):
        super().__init__(init_cfg=init_cfg)
        if not self.accepts(model_name):
            raise ValueError(f"{type(self).__name__} builds {' / '.join(p + '*' for p in self.model_prefixes)} "
                             f"models (and their test_ variants), got model_name={model_name!r}")
        if size_divisor is not None and size_divisor < 1:
            raise ValueError(f'size_divisor must be a positive integer, got {size_divisor}')
        kwargs = dict(model_kwargs or {})
        if checkpoint is not None:
            pretrained = True
            custom_load = timm.models.get_pretrained_cfg(model_name).custom_load
            kwargs['pretrained_cfg_overlay'] = dict(file=str(checkpoint), custom_load=custom_load)
        self.model = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices),
            drop_path_rate=drop_path_rate, **kwargs)
        self.channels_last = str(getattr(self.model, 'output_fmt', 'NCHW')).endswith('NHWC')
        self.size_divisor = size_divisor
        self.reductions = self.model.feature_info.reduction()
        self.channels = self.model.feature_info.channels()
        self.patch_size = self.reductions[0] if any(isinstance(m, GratViTAttention) for m in self.modules()) else None
        out_norm = self.default_out_norm if out_norm is None else out_norm
        eps = self.default_norm_eps if norm_eps is None else norm_eps
        self.out_norms = nn.ModuleList([ChannelLayerNorm(c, eps=eps) for c in self.channels]) if out_norm else None

    @classmethod
    def accepts(cls, model_name: str) -> bool:
        """Whether this family builds ``model_name`` (its registered variants and its tiny ``test_`` model)."""
        arch = model_name.split('.')[0]
        if not cls.model_prefixes:
            return True
        return arch.startswith(cls.model_prefixes) or any(
            arch == 'test_' + p.rstrip('_') for p in cls.model_prefixes)

    def init_weights(self):
        # The model is initialised (or loaded) when it is built; mmengine's recursive init_weights would reach
        # timm's own init_weights methods and overwrite pretrained weights.
        self._is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        height, width = x.shape[-2:]
        if self.size_divisor:
            pad_h = -height % self.size_divisor
            pad_w = -width % self.size_divisor
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.patch_size is not None:
            set_grat_grid(self.model, (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size))
        features = []
        for i, feat in enumerate(self.model(x)):
            if self.channels_last:
                feat = feat.permute(0, 3, 1, 2)
            if self.size_divisor:
                stride = self.reductions[i]
                feat = feat[..., :math.ceil(height / stride), :math.ceil(width / stride)]
            if self.out_norms is not None:
                feat = self.out_norms[i](feat)
            features.append(feat.contiguous())
        return tuple(features)


def _family(name: str, prefixes: Tuple[str, ...], out_norm: bool, eps: float, doc: str):
    cls = type(name, (TimmFeatureBackbone,), dict(
        model_prefixes=prefixes, default_out_norm=out_norm, default_norm_eps=eps, __doc__=doc,
        __module__=__name__))
    return MODELS.register_module(name=name, module=cls)


# (registered name, accepted model prefixes, LayerNorm per output, its eps, what the original dense backbone does)
_FAMILIES = [
    ('NATBackbone', ('nat_',), True, 1e-5, 'NAT: LayerNorm `norm{i}` per output (original segmentation backbone).'),
    ('DiNATBackbone', ('dinat_',), True, 1e-5,
     'DiNAT: LayerNorm per output; the published ADE20K configs set input-size dependent dilations.'),
    ('L2ViTBackbone', ('l2vit_',), True, 1e-5, 'L2ViT: LayerNorm `norm{i}` per output (window 7 in the original).'),
    ('MAViTBackbone', ('mavit_',), True, 1e-6, 'MALA (MAViT): `extra_norms` LayerNorm2d (eps 1e-6) per output.'),
    ('RAVLTBackbone', ('ravlt_',), True, 1e-6, 'RALA (RAVLT): `extra_norms` LayerNorm2d (eps 1e-6) per output.'),
    ('BiFormerBackbone', ('biformer_',), True, 1e-6,
     'BiFormer: `extra_norms` LayerNorm2d per output; ADE20K configs use n_win=8.'),
    ('VCMambaBackbone', ('vcmamba_',), False, 1e-6, 'VCMamba: raw stage outputs (no output norms).'),
    ('InLineDeiTBackbone', ('inline_deit_',), False, 1e-6,
     'InLine-DeiT: block outputs for a MultiLevelNeck, as mmseg does for DeiT.'),
    ('InLinePVTBackbone', ('inline_pvt_',), False, 1e-6, 'InLine-PVT: raw stage outputs, as PVT returns them.'),
    ('InLineSwinBackbone', ('inline_swin_',), True, 1e-5, 'InLine-Swin: LayerNorm per output, as Swin does.'),
    ('InLineCSwinBackbone', ('inline_cswin_',), True, 1e-5, 'InLine-CSWin: LayerNorm per output, as CSWin does.'),
    ('GRATViTBackbone', ('deit_small_patch16_224_grat', 'vit_base_patch16_224_grat', 'test_vit_grat'), False, 1e-6,
     'ViT/DeiT with GRAT attention: block outputs for a MultiLevelNeck; the GRAT grid follows the input.'),
]

MODELS.register_module(name='TimmFeatureBackbone', module=TimmFeatureBackbone)
FAMILY_BACKBONES = {name: _family(name, prefixes, norm, eps, doc) for name, prefixes, norm, eps, doc in _FAMILIES}
