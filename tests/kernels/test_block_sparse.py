"""Block-sparse attention: reference vs the dense masked definition, Triton (interpreter on CPU) vs reference,
outputs, LSE and gradients; FlexAttention with the same pattern; bad input."""
import math

import pytest
import torch

from visionmix.kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_mask,
    block_token_table,
    transpose_index,
    uniform_offsets,
)
from visionmix.kernels.testing import assert_close, rel_rms_error

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def dense_attention(q, k, v, mask, scale):
    """Float64 masked softmax over ``mask [B|1, H|1, Nq, Nk]``; empty rows give 0 and lse -inf."""
    group = q.shape[2] // k.shape[2]
    kk = k.double().repeat_interleave(group, 2)
    vv = v.double().repeat_interleave(group, 2)
    s = torch.einsum('bqhd,bkhd->bhqk', q.double(), kk) * scale
    s = s.masked_fill(~mask, float('-inf'))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return torch.einsum('bhqk,bkhd->bqhd', p, vv), lse.permute(0, 2, 1)


def random_index(batch, heads, q_blocks, k_blocks, slots, generator, full=False):
    idx = torch.stack([torch.randperm(k_blocks, generator=generator)[:slots]
                       for _ in range(batch * heads * q_blocks)]).view(batch, heads, q_blocks, slots)
    num = None if full else torch.randint(0, slots + 1, (batch, heads, q_blocks), generator=generator)
    return idx, num


def grid_partition(grid, region):
    """Permutation that makes every ``region`` box of a ``grid`` (1-D/2-D/3-D) a contiguous block."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing='ij'), -1).reshape(-1, len(grid))
    region_id = torch.zeros(coords.shape[0], dtype=torch.long)
    inside = torch.zeros(coords.shape[0], dtype=torch.long)
    for axis, (n, r) in enumerate(zip(grid, region)):
        region_id = region_id * (n // r) + coords[:, axis] // r
        inside = inside * r + coords[:, axis] % r
    return torch.argsort(region_id * math.prod(region) + inside)


# ---------------------------------------------------------------------------------------------------------------
# reference: the gathered form against the dense masked definition

@pytest.mark.parametrize('gather', [True, False], ids=['gathered', 'dense'])
@pytest.mark.parametrize('causal', [False, True])
def test_reference_matches_dense_definition(causal, gather):
    g = torch.Generator().manual_seed(0)
    B, nq, nk, H, Hk = 2, 37, 45, 4, 2
    q_off, k_off = [0, 5, 17, 30, 37], [0, 3, 10, 20, 33, 45]
    q = torch.randn(B, nq, H, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, nk, Hk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(B, nk, Hk, 5, generator=g, dtype=torch.float64)
    idx, num = random_index(B, H, 4, 5, 3, g)
    key_mask = torch.rand(B, nk, generator=g) > 0.2
    out, lse = block_sparse_attention_reference(q, k, v, idx, num, q_off, k_off, key_mask, causal, gather=gather)
    mask = block_sparse_mask(idx, num, q_off, k_off, key_mask, causal)
    ref_out, ref_lse = dense_attention(q, k, v, mask, 8 ** -0.5)
    assert (out - ref_out).abs().max() < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (lse - ref_lse).nan_to_num(0, 0, 0).abs().max() < 1e-5  # lse is float32
    assert torch.isinf(lse).any(), 'the case should contain empty rows'


@pytest.mark.parametrize('grid,region', [((24,), (4,)), ((8, 12), (4, 3)), ((4, 6, 8), (2, 3, 4))])
def test_routed_regions_on_token_grids(grid, region):
    """1-D/2-D/3-D maps: regions made contiguous by a permutation, top-k routed, equal dense attention over
    the unpermuted map with the region-level mask."""
    g = torch.Generator().manual_seed(1)
    n, size = math.prod(grid), math.prod(region)
    blocks = n // size
    perm = grid_partition(grid, region)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    idx, _ = random_index(2, 1, blocks, blocks, 2, g, full=True)  # head-shared, as BiFormer routes
    region_of = torch.empty(n, dtype=torch.long)
    region_of[perm] = torch.arange(n) // size
    block_mask = torch.zeros(2, 1, blocks, blocks, dtype=torch.bool).scatter_(-1, idx, True)
    mask = block_mask[:, :, region_of][..., region_of]
    ref, _ = dense_attention(q, k, v, mask, 16 ** -0.5)
    out = block_sparse_attention(q[:, perm], k[:, perm], v[:, perm], idx, block_size=size, backend='torch')
    assert (out[:, torch.argsort(perm)] - ref).abs().max() < 1e-12
    q32, k32, v32 = (t[:, perm].float() for t in (q, k, v))
    out = block_sparse_attention(q32, k32, v32, idx, block_size=size, backend='triton')
    assert_close('triton', out[:, torch.argsort(perm)], ref, TOL[torch.float32])


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 20, 4, 8, device='meta')
    k, v = torch.empty(2, 20, 2, 8, device='meta'), torch.empty(2, 20, 2, 6, device='meta')
    idx = torch.zeros(1, 1, 3, 2, dtype=torch.long, device='meta')
    out, lse = block_sparse_attention(q, k, v, idx, block_size=8, validate_index=False, return_lse=True)
    assert out.shape == (2, 20, 4, 6) and lse.shape == (2, 20, 4)
    for gather in (True, False):
        out, _ = block_sparse_attention_reference(q, k, v, idx, None, [0, 8, 16, 20], [0, 8, 16, 20], gather=gather)
        assert out.shape == (2, 20, 4, 6)


def test_transpose_index_lists_query_blocks_of_each_key_block():
    idx = torch.tensor([[[[2, 0, 1], [1, 3, 3], [0, 2, 2]]]])
    num = torch.tensor([[[2, 1, 2]]])
    q_idx, q_num = transpose_index(idx, num, 4)
    assert q_num.tolist() == [[[2, 1, 2, 0]]]
    assert q_idx[0, 0, 0, :2].tolist() == [0, 2] and q_idx[0, 0, 1, 0] == 1 and q_idx[0, 0, 2, :2].tolist() == [0, 2]


def test_block_tables():
    assert uniform_offsets(10, 4) == (0, 4, 8, 10)
    assert block_token_table([0, 2, 5]).tolist() == [[0, 1, -1], [2, 3, 4]]


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference

CASES = {
    # name: (B, Nq, Nk, Hq, Hkv, D, Dv, blocks, slots, causal, key_mask, index heads)
    'varlen_gqa_keymask': (2, 37, 45, 4, 2, 8, 5, ([0, 5, 17, 30, 37], [0, 3, 10, 20, 33, 45]), 3, False, True, 4),
    'varlen_causal': (1, 40, 40, 2, 2, 16, 16, ([0, 7, 20, 33, 40], [0, 7, 20, 33, 40]), 4, True, False, 2),
    'tiny_regions_shared': (2, 64, 64, 3, 3, 16, 24, (4, 4), 5, False, False, 1),
    'large_blocks_short_tail': (1, 150, 150, 2, 1, 32, 32, (64, 64), 2, True, True, 2),
    'cross_attention': (1, 24, 70, 2, 2, 16, 16, (8, 10), 4, True, False, 1),
    'wide_heads': (1, 40, 40, 2, 1, 160, 144, ([0, 9, 25, 40], [0, 16, 32, 40]), 2, False, True, 2),
}


def _case_inputs(name, dtype, seed=0):
    B, nq, nk, hq, hkv, d, dv, blocks, slots, causal, km, hi = CASES[name]
    g = torch.Generator().manual_seed(seed)
    if isinstance(blocks[0], list):
        kw = dict(q_block_offsets=blocks[0], k_block_offsets=blocks[1])
        mq, mk = len(blocks[0]) - 1, len(blocks[1]) - 1
    else:
        kw = dict(block_size=blocks)
        mq, mk = -(-nq // blocks[0]), -(-nk // blocks[1])
    idx, num = random_index(B, hi, mq, mk, min(slots, mk), g)
    q = torch.randn(B, nq, hq, d, generator=g).to(dtype)
    k = torch.randn(B, nk, hkv, d, generator=g).to(dtype)
    v = torch.randn(B, nk, hkv, dv, generator=g).to(dtype)
    key_mask = (torch.rand(B, nk, generator=g) > 0.25) if km else None
    dout = torch.randn(B, nq, hq, dv, generator=g).to(dtype)
    dlse = torch.randn(B, nq, hq, generator=g)
    return (q, k, v), dict(kv_indices=idx, kv_num_blocks=num, key_mask=key_mask, is_causal=causal, **kw), dout, dlse


def _forward_backward(tensors, kwargs, dout, dlse, backend):
    q, k, v = (t.detach().clone().requires_grad_() for t in tensors)
    out, lse = block_sparse_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
    finite = torch.isfinite(lse)
    (out.float() * dout.float()).sum().add((lse[finite] * dlse[finite]).sum()).backward()
    return {'out': out, 'lse': lse, 'dq': q.grad, 'dk': k.grad, 'dv': v.grad}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=['fp32', 'fp16', 'bf16'])
@pytest.mark.parametrize('name', list(CASES))
def test_triton_matches_reference(name, dtype):
    tensors, kwargs, dout, dlse = _case_inputs(name, dtype)
    got = _forward_backward(tensors, kwargs, dout, dlse, 'triton')
    truth = _forward_backward([t.double() for t in tensors], kwargs, dout.double(), dlse.double(), 'torch')
    same_dtype = _forward_backward(tensors, kwargs, dout, dlse, 'torch') if dtype != torch.float32 else truth
    assert torch.equal(torch.isinf(got['lse']), torch.isinf(truth['lse']))
    for key in truth:
        tol = TOL[dtype] if dtype == torch.float32 else max(TOL[dtype], 2 * rel_rms_error(same_dtype[key],
                                                                                          truth[key]))
        assert_close(f'{name} {key}', got[key], truth[key], tol)


def test_empty_rows_give_zeros_and_no_nan():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    idx = torch.zeros(1, 1, 4, 2, dtype=torch.long)
    num = torch.tensor([[[0, 2, 0, 1]]])
    idx[0, 0, 1] = torch.tensor([3, 1])
    out, lse = block_sparse_attention(q, k, v, idx, num, block_size=8, return_lse=True, backend='triton')
    assert torch.all(out[:, :8] == 0) and torch.all(torch.isinf(lse[:, :8]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :8] == 0)
    out0 = block_sparse_attention(q, k, v, idx[..., :0], torch.zeros_like(num), block_size=8, backend='triton')
    assert torch.all(out0 == 0)


def test_triton_backward_is_deterministic():
    tensors, kwargs, dout, dlse = _case_inputs('varlen_gqa_keymask', torch.float32, seed=5)
    first = _forward_backward(tensors, kwargs, dout, dlse, 'triton')
    second = _forward_backward(tensors, kwargs, dout, dlse, 'triton')
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
def test_flex_attention_with_the_same_pattern_agrees():
    flex = pytest.importorskip('torch.nn.attention.flex_attention')
    g = torch.Generator().manual_seed(4)
    B, H, n, d, size = 1, 2, 128, 16, 16
    q, k, v = (torch.randn(B, n, H, d, generator=g) for _ in range(3))
    idx, num = random_index(B, H, n // size, n // size, 3, g)
    num = num.clamp_min(1)
    ours = block_sparse_attention(q, k, v, idx, num, block_size=size, backend='triton')
    dense = block_sparse_mask(idx, num, uniform_offsets(n, size), uniform_offsets(n, size))
    block_mask = flex.create_block_mask(lambda b, h, qi, ki: dense[b, h, qi, ki], B, H, n, n, device='cpu',
                                        BLOCK_SIZE=size)
    theirs = flex.flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask).transpose(1, 2)
    assert_close('flex vs block-sparse', ours, theirs, 1e-5)


def test_torch_compile_fullgraph():
    tensors, kwargs, _, _ = _case_inputs('tiny_regions_shared', torch.float32)
    fn = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, validate_index=False, backend='triton',
                                                              **kwargs), fullgraph=True, backend='eager')
    assert_close('compiled', fn(*tensors), block_sparse_attention(*tensors, backend='torch', **kwargs), 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_rejects_bad_arguments():
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    idx = torch.tensor([[[[0], [1]]]])
    ok = dict(kv_indices=idx, block_size=8)
    block_sparse_attention(q, k, v, **ok)
    bad = [
        (dict(q=q[0]), 'q must have layout'),
        (dict(kv_indices=idx.float()), 'kv_indices must be an integer tensor'),
        (dict(kv_indices=idx[:, :, :1]), 'query blocks'),
        (dict(kv_indices=torch.tensor([[[[0], [2]]]])), r'key-block ids in \[0, 2\)'),
        (dict(kv_indices=torch.tensor([[[[0, 0], [1, 0]]]])), 'twice'),
        (dict(kv_num_blocks=torch.tensor([[[1, 2]]])), r'kv_num_blocks must lie in \[0, slots'),
        (dict(kv_num_blocks=torch.tensor([1, 1])), 'kv_num_blocks must be an integer tensor of shape'),
        (dict(block_size=0), 'block_size must be a positive int'),
        (dict(block_size=None), 'block_size, or both'),
        (dict(block_size=None, q_block_offsets=[0, 8, 16], k_block_offsets=[0, 8, 15]), 'end at the token count 16'),
        (dict(block_size=None, q_block_offsets=[0, 8, 8, 16], k_block_offsets=[0, 8, 16]), 'strictly increasing'),
        (dict(block_size=8, q_block_offsets=[0, 8, 16]), 'either block_size or'),
        (dict(key_mask=torch.ones(1, 16)), 'key_mask must be a bool tensor'),
        (dict(v=v.double()), 'share one dtype'),
        (dict(k=torch.randn(1, 16, 3, 8), v=torch.randn(1, 16, 3, 8)), 'multiple of heads'),
        (dict(backend='cuda'), 'backend must be one of'),
    ]
    for change, message in bad:
        args = dict(q=q, k=k, v=v, **ok)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(**args)
    with pytest.raises(ValueError, match='triton backend supports'):
        block_sparse_attention(q.double(), k.double(), v.double(), idx, block_size=8, backend='triton')
