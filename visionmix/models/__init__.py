"""Model families, registered with timm on import (one file per family)."""
from .l2vit import L2ViT
from .nat import NAT

__all__ = ['L2ViT', 'NAT']
