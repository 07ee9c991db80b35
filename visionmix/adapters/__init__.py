"""Adapters: training-free attention swaps for timm models and attention processors for diffusers.

``visionmix.adapters.diffusers_grat`` needs diffusers and is imported on use, not here.
"""
from .swap import GratViTAttention, set_grat_grid, swap_attention

__all__ = ['GratViTAttention', 'set_grat_grid', 'swap_attention']
