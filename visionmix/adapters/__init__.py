"""Adapters: training-free attention swaps for timm models, attention processors for diffusers, streaming video.

``visionmix.adapters.streaming`` is the Hybrid Forcing streaming engine. ``visionmix.adapters.diffusers_grat`` and
``visionmix.adapters.diffusers_wan_streaming`` need diffusers and are imported on use, not here.
"""
from .swap import GratViTAttention, set_grat_grid, swap_attention

__all__ = ['GratViTAttention', 'set_grat_grid', 'swap_attention']
