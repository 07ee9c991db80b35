"""visionmix: efficient-attention vision and video backbones for timm, on Triton kernels."""
__version__ = '0.1.0'

from . import kernels, layers, models  # noqa: E402,F401  (importing models registers them with timm)
from .adapters import swap_attention  # noqa: E402,F401
