"""nn.Modules built on visionmix kernels, shared by several model families."""
from .grat import grat_attention, grat_index
from .inline_attention import InLineAttention
from .neighborhood_attention import (
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = ['grat_attention', 'grat_index', 'InLineAttention', 'NeighborhoodAttention', 'NeighborhoodAttention1D',
           'NeighborhoodAttention2D', 'NeighborhoodAttention3D']
