"""Model families, registered with timm on import (one file per family)."""
from . import grat_vit  # noqa: F401  (timm ViT/DeiT with GRAT attention)
from .biformer import BiFormer
from .inline import InLineCSwin, InLineDeiT, InLinePVT, InLineSwin
from .l2vit import L2ViT
from .mala import MALA
from .nat import NAT
from .vcmamba import VCMamba

__all__ = ['BiFormer', 'L2ViT', 'MALA', 'NAT', 'InLineDeiT', 'InLinePVT', 'InLineSwin', 'InLineCSwin', 'VCMamba']
