"""GRAT on the block-sparse op: the parity fixtures, an independent token-level rule, FlexAttention, bad input."""
import itertools
import warnings

import pytest
import torch

from tests.conftest import parity_files
from visionmix.kernels.block_sparse import block_sparse_mask
from visionmix.layers.grat import (
    grat_attention,
    grat_dense_mask,
    grat_group_mask,
    grat_index,
    group_permutation,
)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _fixture_args(params):
    if 'image_hw' in params:  # GRAT-B 2-D, no text
        return dict(grid=params['image_hw'], group_size=params['group_hw'], mode='B', radius=params['radius_b'])
    return dict(grid=params['latent_thw'], group_size=params['group_thw'], mode='X',
                text_tokens=params['text_length'], text_first=False, attenable_text=params['attenable_text'])


@pytest.mark.parametrize('path', parity_files('kernels', 'grat_*.pt'))
def test_fixture(path):
    case = torch.load(path, weights_only=True)
    params, expected = case['params'], case['outputs']
    args = _fixture_args(params)
    q, k, v = (case['inputs'][n].double().transpose(1, 2) for n in 'qkv')  # fixtures are [B, heads, N, D]
    out, lse = grat_attention(q, k, v, **args, scale=params['scale'], return_lse=True, backend='torch')
    assert _rel(out.transpose(1, 2), expected['out']) < 1e-6
    assert _rel(lse.transpose(1, 2), expected['lse']) < 1e-6

    idx = grat_index(**args)
    assert torch.equal(idx.group_mask, expected['group_mask'])
    clustered = block_sparse_mask(idx.kv_indices, idx.kv_num_blocks, idx.offsets, idx.offsets, idx.key_mask)[0, 0]
    if 'token_mask_clustered' in expected:
        assert torch.equal(clustered, expected['token_mask_clustered'])
    assert torch.equal(clustered[idx.inv_perm][:, idx.inv_perm], expected['token_mask_raster'])
    assert torch.equal(grat_dense_mask(**args), expected['token_mask_raster'])
    if 'cluster_perm' in expected:
        assert torch.equal(idx.perm, expected['cluster_perm'])
    num_img = len(expected['token_group_raster'])
    group_len = idx.offsets[1] - idx.offsets[0]
    assert torch.equal(idx.inv_perm[:num_img] // group_len, expected['token_group_raster'])


def _token_rule(grid, group_size, mode, radius, text_tokens, text_first, attenable_text):
    """Dense [N, N] mask from token coordinates, written independently of the block index."""
    coords = torch.tensor(list(itertools.product(*[range(n) for n in grid])))
    groups = coords // torch.tensor(group_size)
    diff = (groups[:, None] - groups[None, :]).abs()
    img = (diff == 0).any(-1) if mode == 'X' else (diff <= radius).all(-1)
    n_img = len(coords)
    n = n_img + text_tokens
    mask = torch.ones(n, n, dtype=torch.bool)
    sl = slice(text_tokens, n) if text_first else slice(0, n_img)
    mask[sl, sl] = img
    if attenable_text is not None:
        start = 0 if text_first else n_img
        mask[:, start + attenable_text:start + text_tokens] = False
    return mask


def _dense(q, k, v, mask, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum('bqhd,bkhd->bhqk', q.double(), k.double()) * scale
    logits = logits.masked_fill(~mask, float('-inf'))
    lse = torch.logsumexp(logits, -1)
    out = torch.einsum('bhqk,bkhd->bqhd', torch.softmax(logits, -1), v.double())
    return out, lse.transpose(1, 2)


CASES = [
    dict(grid=(8, 12), group_size=(2, 3), mode='B', radius=1),
    dict(grid=(8, 12), group_size=(4, 2), mode='B', radius=(1, 2), text_tokens=5, text_first=True),
    dict(grid=(6, 8), group_size=2, mode='X', text_tokens=4, text_first=True, attenable_text=2),
    dict(grid=(6, 8), group_size=(3, 2), mode='X', text_tokens=3, text_first=False, attenable_text=3),
    dict(grid=(4, 6, 4), group_size=(2, 2, 2), mode='B', radius=1, text_tokens=6, attenable_text=4),
    dict(grid=(6, 4, 4), group_size=(2, 2, 1), mode='B', radius=1, text_tokens=2, text_first=True),
    dict(grid=(4, 4, 6), group_size=(1, 2, 3), mode='X'),
    dict(grid=(4, 4, 6), group_size=(2, 2, 2), mode='X', text_tokens=5, text_first=True, attenable_text=0),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
def test_against_token_rule(case):
    full = {**dict(radius=1, text_tokens=0, text_first=False, attenable_text=None), **case}
    mask = _token_rule(full['grid'], _tuple(full['group_size'], len(full['grid'])), full['mode'],
                       torch.tensor(_tuple(full['radius'], len(full['grid']))), full['text_tokens'],
                       full['text_first'], full['attenable_text'])
    assert torch.equal(grat_dense_mask(**case), mask)
    torch.manual_seed(0)
    n = mask.shape[0]
    q, k, v = torch.randn(3, 2, n, 4, 8, dtype=torch.float64).unbind(0)
    out, lse = grat_attention(q, k, v, **case, return_lse=True)
    ref_out, ref_lse = _dense(q, k, v, mask)
    assert _rel(out, ref_out) < 1e-12
    assert _rel(lse, ref_lse) < 1e-6  # the op returns lse in float32


def _tuple(x, rank):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank


def test_key_mask_and_gqa():
    """A per-batch key mask (a prompt length per item) on top of the pattern; fewer k/v heads than q heads."""
    grid, group_size, text = (4, 6), 2, 5
    n = 24 + text
    torch.manual_seed(1)
    q = torch.randn(2, n, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, n, 2, 8, dtype=torch.float64).unbind(0)
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[0, 24 + 3:] = False
    key_mask[1, 24 + 1:] = False
    out = grat_attention(q, k, v, grid, group_size, 'X', text_tokens=text, attenable_text=4, key_mask=key_mask)
    mask = grat_dense_mask(grid, group_size, 'X', text_tokens=text, attenable_text=4)[None, None] \
        & key_mask[:, None, None, :]
    ref, _ = _dense(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), mask)
    assert _rel(out, ref) < 1e-12


def test_full_coverage_is_dense():
    grid, group_size = (4, 3, 6), (2, 1, 3)
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 1, 72 + 3, 2, 8, dtype=torch.float64).unbind(0)
    out = grat_attention(q, k, v, grid, group_size, 'B', radius=4, text_tokens=3, text_first=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert _rel(out, ref) < 1e-12


def test_group_rules():
    # GRAT-X in 3-D is the union of three planes of the group grid (official code), not three lines
    mask = grat_group_mask((8, 6, 10), 'X')
    assert int(mask[0].sum()) == 165
    # GRAT-B clips the window at the border: a corner group sees (b + 1)^2 groups, an inner one (2b + 1)^2
    mask = grat_group_mask((5, 5), 'B', 1)
    assert int(mask[0].sum()) == 4 and int(mask[12].sum()) == 9
    assert torch.equal(grat_group_mask((4, 4), 'X'), grat_group_mask((4, 4), 'x'))


def test_permutation_is_clusterify_order():
    perm = group_permutation((2, 4, 4), (1, 2, 2))
    # first group: t=0, rows 0-1, cols 0-1 in raster order; then the group to its right
    assert perm[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert torch.equal(torch.sort(perm).values, torch.arange(32))


def test_index_is_cached_and_valid():
    a = grat_index((8, 8), 2, 'B', 1, text_tokens=3, text_first=True)
    assert grat_index([8, 8], (2, 2), 'b', 1, text_tokens=3, text_first=True) is a
    assert a.kv_indices.dtype == torch.int32 and a.kv_indices.shape[:2] == (1, 1)
    assert a.offsets == (0, 3) + tuple(3 + 4 * i for i in range(1, 17))
    # the op's own validation accepts the index (the attention call skips it: valid by construction)
    from visionmix.kernels.block_sparse import block_sparse_attention
    q = torch.randn(1, 67, 1, 4)
    block_sparse_attention(q, q, q, a.kv_indices, a.kv_num_blocks, q_block_offsets=a.offsets,
                           k_block_offsets=a.offsets, validate_index=True)


@pytest.mark.parametrize('case', [CASES[2], CASES[4]], ids=['2d', '3d'])
def test_flex_attention_agrees(case):
    flex = pytest.importorskip('torch.nn.attention.flex_attention')
    idx = grat_index(**case)
    mask = block_sparse_mask(idx.kv_indices, idx.kv_num_blocks, idx.offsets, idx.offsets, idx.key_mask)[0, 0]
    n = mask.shape[0]
    block_mask = flex.create_block_mask(lambda b, h, qi, ki: mask[qi, ki], None, None, n, n, device='cpu')
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 2, n, 2, 16).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # eager flex_attention on CPU warns that it is unfused
        grouped = [t.index_select(1, idx.perm).transpose(1, 2) for t in (q, k, v)]
        out = flex.flex_attention(*grouped, block_mask=block_mask).transpose(1, 2).index_select(1, idx.inv_perm)
    ref = grat_attention(q, k, v, **case)
    assert _rel(out, ref) < 1e-5


def test_index_built_on_host_inside_meta_context():
    with torch.device('meta'):  # timm builds models this way for shape tests
        idx = grat_index((6, 10), (3, 5), 'B', 1, text_tokens=3, text_first=True, device='cpu')
    assert idx.kv_indices.device.type == 'cpu' and idx.perm.device.type == 'cpu'


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 16 + 1, 3, 8, device='meta')
    out, lse = grat_attention(q, q, q, (4, 4), 2, 'X', text_tokens=1, text_first=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 17, 3) and out.is_meta


@pytest.mark.parametrize('kwargs, match', [
    (dict(grid=(6, 7), group_size=2), 'divisible'),
    (dict(grid=(4, 6, 9), group_size=(2, 2, 2)), 'divisible'),
    (dict(grid=(4,), group_size=2), r'\(H, W\)'),
    (dict(grid=(4, 4), group_size=(2, 2, 2)), 'group_size'),
    (dict(grid=(4, 4), group_size=2, mode='Y'), 'mode'),
    (dict(grid=(4, 4), group_size=2, radius=-1), 'radius'),
    (dict(grid=(4, 4), group_size=2, text_tokens=2, attenable_text=3), 'attenable_text'),
    (dict(grid=(4, 4), group_size=2, text_tokens=-1), 'text_tokens'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grat_index(**kwargs)


def test_wrong_token_count():
    q = torch.randn(1, 17, 2, 8)
    with pytest.raises(ValueError, match='tokens'):
        grat_attention(q, q, q, (4, 4), 2)
    with pytest.raises(ValueError, match='key_mask'):
        grat_attention(q, q, q, (4, 4), 2, text_tokens=1, key_mask=torch.ones(1, 16, dtype=torch.bool))


@pytest.mark.gpu
def test_triton_matches_reference():
    case = dict(grid=(4, 8, 8), group_size=(2, 4, 4), mode='X', text_tokens=7, attenable_text=5)
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 2, 256 + 7, 4, 64, device='cuda', dtype=torch.bfloat16).unbind(0)
    out = grat_attention(q, k, v, **case, backend='triton')
    ref = grat_attention(q, k, v, **case, backend='torch')
    assert _rel(out, ref) < 2e-2
