"""visionmix operators: Triton kernels with pure-PyTorch references."""
from ._backend import interpreter_mode, resolve_backend, triton_available
from .block_sparse import block_sparse_attention
from .linear_attention import linear_attention
from .neighborhood import na1d, na2d, na3d, neighborhood_attention
from .selective_scan import selective_scan, selective_scan_multidir

__all__ = ['block_sparse_attention', 'na1d', 'na2d', 'na3d', 'neighborhood_attention', 'linear_attention',
           'selective_scan', 'selective_scan_multidir',
           'resolve_backend', 'interpreter_mode', 'triton_available']
