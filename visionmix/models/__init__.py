"""Model families, registered with timm on import (one file per family)."""
from .inline import InLineCSwin, InLineDeiT, InLinePVT, InLineSwin
from .l2vit import L2ViT
from .mala import MALA
from .nat import NAT

__all__ = ['L2ViT', 'MALA', 'NAT', 'InLineDeiT', 'InLinePVT', 'InLineSwin', 'InLineCSwin']
