"""NeighborhoodAttention{1,2,3}D modules: qkv -> neighborhood attention -> proj, with an optional bias table."""
import pytest
import torch

from visionmix.kernels import neighborhood_attention
from visionmix.kernels.testing import assert_close
from visionmix.layers import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D


@pytest.mark.parametrize('cls,spatial,kernel,dilation,causal', [
    (NeighborhoodAttention1D, (19,), 5, 3, True),
    (NeighborhoodAttention2D, (9, 12), (3, 5), (3, 2), False),
    (NeighborhoodAttention3D, (4, 6, 5), (2, 3, 3), 1, (True, False, False)),
])
def test_module_equals_projections_around_the_op(cls, spatial, kernel, dilation, causal):
    torch.manual_seed(0)
    attn = cls(32, 4, kernel_size=kernel, dilation=dilation, is_causal=causal, rel_pos_bias=True).double()
    x = torch.randn(2, *spatial, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    q, k, v = attn.qkv(x).unflatten(-1, (3, 4, 8)).unbind(-3)
    ref = attn.proj(neighborhood_attention(q, k, v, kernel, 1, dilation, causal, rpb=attn.rpb).flatten(-2))
    assert_close('out', out, ref, 1e-12, atol=1e-12)
    out.sum().backward()
    assert attn.rpb.grad.abs().sum() > 0 and x.grad.shape == x.shape
    assert attn.rpb.shape == (4, *[2 * kk - 1 for kk in attn.kernel_size])


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match='divisible by num_heads'):
        NeighborhoodAttention2D(30, 4, kernel_size=3)
    with pytest.raises(ValueError, match='channels-last'):
        NeighborhoodAttention3D(32, 4, kernel_size=3)(torch.randn(1, 6, 6, 32))
