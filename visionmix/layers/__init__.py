"""nn.Modules built on visionmix kernels, shared by several model families."""
from .inline_attention import InLineAttention
from .neighborhood_attention import (
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = ['InLineAttention', 'NeighborhoodAttention', 'NeighborhoodAttention1D', 'NeighborhoodAttention2D',
           'NeighborhoodAttention3D']
