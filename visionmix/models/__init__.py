"""Model families, registered with timm on import (one file per family)."""
from .nat import NAT

__all__ = ['NAT']
