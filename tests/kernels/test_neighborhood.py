"""Neighborhood attention: reference vs NATTEN fixtures, Triton (interpreter on CPU) vs reference, bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import parity_files
from visionmix.kernels import na1d, na2d, na3d, neighborhood_attention
from visionmix.kernels._backend import resolve_backend
from visionmix.kernels.neighborhood.reference import na_backward_reference, na_forward_reference, neighbourhood_mask
from visionmix.kernels.testing import assert_close, compare_forward_backward, rel_rms_error

NA_FNS = {1: na1d, 2: na2d, 3: na3d}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def _random_qkv(batch, spatial, heads_q, heads_kv, head_dim, head_dim_v=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head_dim_v = head_dim_v or head_dim
    q = torch.randn(batch, *spatial, heads_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, *spatial, heads_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, *spatial, heads_kv, head_dim_v, generator=gen).to(dtype)
    return q, k, v


def _dense_masked_attention(q, k, v, mask, scale, bias=None):
    """Plain dense softmax over all tokens with a boolean mask: an independent check of the gather reference."""
    B, H = q.shape[0], q.shape[-2]
    qf, kf, vf = (t.reshape(B, -1, t.shape[-2], t.shape[-1]).transpose(1, 2) for t in (q, k, v))
    kf = kf.repeat_interleave(H // kf.shape[1], 1)
    vf = vf.repeat_interleave(H // vf.shape[1], 1)
    s = (qf * scale) @ kf.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float('-inf'))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vf
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1]), lse.transpose(1, 2).reshape(q.shape[:-1])


# ---------------------------------------------------------------------------------------------------------------
# NATTEN fixtures

@pytest.mark.parametrize('path', parity_files('kernels', 'na*.pt'))
def test_reference_matches_natten_fixture(path):
    case = torch.load(path, weights_only=True)
    p, inp, ref = case['params'], case['inputs'], case['outputs']
    assert torch.equal(
        neighbourhood_mask(p['spatial_shape'], p['kernel_size'], p['stride'], p['dilation'], p['is_causal']),
        ref['mask'])
    q, k, v = (inp[n].double().requires_grad_() for n in 'qkv')
    rpb = inp['rpb'].double().requires_grad_() if 'rpb' in inp else None
    out, lse = neighborhood_attention(q, k, v, p['kernel_size'], p['stride'], p['dilation'], p['is_causal'],
                                      rpb=rpb, scale=p['scale'], return_lse=True, backend='torch')
    assert_close('out', out, ref['out'], 1e-12, atol=1e-12)
    assert_close('lse', lse, ref['lse'], 1e-12, atol=1e-12)
    if 'dout' in inp:
        out.backward(inp['dout'])
        for name, t in (('dq', q), ('dk', k), ('dv', v)) + ((('drpb', rpb),) if rpb is not None else ()):
            assert_close(name, t.grad, ref[name], 1e-12, atol=1e-12)


@pytest.mark.parametrize('path', parity_files('kernels', 'na*.pt'))
def test_triton_matches_natten_fixture(path):
    case = torch.load(path, weights_only=True)
    p, inp, ref = case['params'], case['inputs'], case['outputs']
    out, lse = neighborhood_attention(inp['q'], inp['k'], inp['v'], p['kernel_size'], p['stride'], p['dilation'],
                                      p['is_causal'], rpb=inp.get('rpb'), scale=p['scale'], return_lse=True,
                                      backend='triton')
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close('out', out, ref['out'], 1e-5)
    assert_close('lse', lse, ref['lse'], 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# reference: gather form vs a dense masked softmax, closed-form backward vs autograd

@pytest.mark.parametrize('rank,spatial,kernel,stride,dilation,causal', [
    (1, (23,), 6, 1, 3, False),
    (1, (19,), 5, 2, 2, True),
    (2, (9, 13), (3, 4), (1, 2), (2, 3), (False, True)),
    (2, (7, 7), 7, 1, 1, False),
    (3, (4, 6, 5), (2, 3, 3), (2, 1, 3), (1, 2, 1), (True, False, False)),
])
def test_reference_equals_dense_masked_softmax(rank, spatial, kernel, stride, dilation, causal):
    q, k, v = _random_qkv(2, spatial, 4, 2, 8, 12, torch.float64)
    out, lse = NA_FNS[rank](q, k, v, kernel, stride, dilation, causal, return_lse=True, backend='torch')
    to_tuple = lambda x: x if isinstance(x, tuple) else (x,) * rank
    mask = neighbourhood_mask(spatial, to_tuple(kernel), to_tuple(stride), to_tuple(dilation), to_tuple(causal))
    ref_out, ref_lse = _dense_masked_attention(q, k, v, mask, 8 ** -0.5)
    assert_close('out', out, ref_out, 1e-12, atol=1e-12)
    assert_close('lse', lse, ref_lse, 1e-12, atol=1e-12)


@pytest.mark.parametrize('rank,spatial,kernel,stride,dilation,causal,rpb,gqa', [
    (1, (17,), 5, 1, 2, False, True, False),
    (1, (17,), 4, 2, 1, True, False, True),
    (2, (8, 11), (3, 5), 1, (2, 1), False, True, True),
    (2, (9, 10), 4, (2, 1), 1, (True, False), False, False),
    (3, (4, 5, 6), (2, 3, 3), 1, (1, 1, 2), (False, True, False), True, False),
])
def test_closed_form_backward_equals_autograd(rank, spatial, kernel, stride, dilation, causal, rpb, gqa):
    q, k, v = _random_qkv(2, spatial, 4, 2 if gqa else 4, 8, dtype=torch.float64, seed=1)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    bias = torch.randn(4, *[2 * x - 1 for x in ks], dtype=torch.float64) * 0.5 if rpb else None
    args = [list(ks)] + [list(x if isinstance(x, tuple) else (x,) * rank) for x in (stride, dilation, causal)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.clone().requires_grad_()] if rpb else [])
    out, lse = na_forward_reference(*leaves[:3], *args, rpb=leaves[3] if rpb else None, scale=0.3)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    expected = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), leaves)
    got = na_backward_reference(dout, dlse, q, k, v, out.detach(), lse.detach(), *args, rpb=bias, scale=0.3)
    for name, g, e in zip(('dq', 'dk', 'dv', 'drpb'), got, expected):
        assert_close(name, g, e, 1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU) vs reference

TRITON_CASES = [
    # rank, spatial, heads_q, heads_kv, head_dim, head_dim_v, kernel, stride, dilation, causal, rpb
    (1, (37,), 2, 2, 16, 16, 7, 1, 1, False, False),
    (1, (41,), 4, 2, 32, 24, 8, 3, 2, True, False),
    (2, (15, 13), 2, 2, 16, 16, (7, 5), 1, (2, 1), False, True),
    (2, (12, 9), 3, 1, 24, 24, (4, 3), (2, 3), (1, 2), (True, False), False),
    (2, (14, 14), 2, 2, 8, 8, (7, 7), 1, (2, 1), False, True),
    (3, (5, 6, 7), 2, 2, 16, 32, (3, 2, 5), (1, 2, 1), (1, 2, 1), (False, True, False), False),
    (3, (4, 5, 6), 2, 2, 16, 16, 3, 1, 1, (True, False, False), True),
]


def _triton_case_kwargs(rank, heads_q, kernel, stride, dilation, causal, rpb, dtype, seed=0):
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    kwargs = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    if rpb:
        gen = torch.Generator().manual_seed(seed + 7)
        kwargs['rpb'] = (0.5 * torch.randn(heads_q, *[2 * x - 1 for x in ks], generator=gen)).to(dtype)
    return kwargs


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', TRITON_CASES, ids=lambda c: f"{c[0]}d-{'x'.join(map(str, c[1]))}")
def test_triton_forward_matches_reference(case, dtype):
    rank, spatial, hq, hkv, d, dv, kernel, stride, dilation, causal, rpb = case
    q, k, v = _random_qkv(2, spatial, hq, hkv, d, dv, dtype)
    kwargs = _triton_case_kwargs(rank, hq, kernel, stride, dilation, causal, rpb, dtype)
    out, lse = NA_FNS[rank](q, k, v, **kwargs, return_lse=True, backend='triton')
    ref_kwargs = {n: (x.double() if torch.is_tensor(x) else x) for n, x in kwargs.items()}
    ref_out, ref_lse = NA_FNS[rank](q.double(), k.double(), v.double(), **ref_kwargs, return_lse=True,
                                    backend='torch')
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close('out', out, ref_out, TOL[dtype])
    assert_close('lse', lse, ref_lse, TOL[dtype])


def _forward_backward(rank, q, k, v, kwargs, backend, seed=0):
    """Outputs and every gradient of ``sum(out * dout) + sum(lse * dlse)`` (random cotangents)."""
    leaves = {'q': q, 'k': k, 'v': v}
    if 'rpb' in kwargs:
        leaves['rpb'] = kwargs['rpb']
    leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    rest = {n: x for n, x in kwargs.items() if n != 'rpb'}
    out, lse = NA_FNS[rank](leaves['q'], leaves['k'], leaves['v'], **rest, rpb=leaves.get('rpb'), return_lse=True,
                            backend=backend)
    gen = torch.Generator().manual_seed(seed + 11)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.dtype)
    names = list(leaves)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), [leaves[n] for n in names])
    return {'out': out, 'lse': lse, **{'d' + n: g for n, g in zip(names, grads)}}


def _double(kwargs):
    return {n: (x.double() if torch.is_tensor(x) else x) for n, x in kwargs.items()}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', TRITON_CASES, ids=lambda c: f"{c[0]}d-{'x'.join(map(str, c[1]))}")
def test_triton_backward_matches_reference(case, dtype):
    """Outputs, LSE and dq/dk/dv/drpb of the Triton kernels against the float64 reference. For half types
    the error may be at most twice that of the reference run in the same dtype (FlashAttention's rule)."""
    rank, spatial, hq, hkv, d, dv, kernel, stride, dilation, causal, rpb = case
    q, k, v = _random_qkv(2, spatial, hq, hkv, d, dv, dtype, seed=2)
    kwargs = _triton_case_kwargs(rank, hq, kernel, stride, dilation, causal, rpb, dtype)
    got = _forward_backward(rank, q, k, v, kwargs, 'triton')
    truth = _forward_backward(rank, q.double(), k.double(), v.double(), _double(kwargs), 'torch')
    same_dtype = _forward_backward(rank, q, k, v, kwargs, 'torch') if dtype != torch.float32 else None
    assert set(got) == set(truth)
    for name in truth:
        assert got[name].dtype == (torch.float32 if name == 'lse' else dtype)
        tol = TOL[dtype]
        if same_dtype is not None:
            tol = max(tol, 2 * rel_rms_error(same_dtype[name], truth[name]))
        assert_close(name, got[name], truth[name], tol)


@pytest.mark.parametrize('path', parity_files('kernels', 'na*.pt'))
def test_triton_backward_matches_natten_fixture(path):
    case = torch.load(path, weights_only=True)
    p, inp, ref = case['params'], case['inputs'], case['outputs']
    if 'dout' not in inp:
        pytest.skip('fixture has no gradients')
    leaves = [inp[n].clone().requires_grad_() for n in 'qkv']
    rpb = inp['rpb'].clone().requires_grad_() if 'rpb' in inp else None
    out = neighborhood_attention(*leaves, p['kernel_size'], p['stride'], p['dilation'], p['is_causal'], rpb=rpb,
                                 scale=p['scale'], backend='triton')
    out.backward(inp['dout'])
    for name, t in (('dq', leaves[0]), ('dk', leaves[1]), ('dv', leaves[2])) + ((('drpb', rpb),) if rpb is not None
                                                                                else ()):
        assert_close(name, t.grad, ref[name], 1e-5)


def test_triton_backward_is_deterministic():
    """No atomics anywhere: two backward passes agree bit for bit, bias gradient and GQA included."""
    q, k, v = _random_qkv(2, (11, 13), 4, 2, 16, seed=5)
    kwargs = _triton_case_kwargs(2, 4, (5, 3), 1, (2, 1), False, True, torch.float32)
    first = _forward_backward(2, q, k, v, kwargs, 'triton')
    second = _forward_backward(2, q, k, v, kwargs, 'triton')
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_fully_masked_rows_give_zeros(backend):
    """A bias of -inf on the interior offsets masks every key of the interior queries: zeros, lse = -inf and
    finite gradients, while the border queries (whose windows reach other offsets) stay finite."""
    q, k, v = _random_qkv(1, (9,), 2, 2, 16, seed=6)
    rpb = torch.zeros(2, 5)
    rpb[:, 1:4] = float('-inf')
    got = _forward_backward(1, q, k, v, dict(kernel_size=3, rpb=rpb), backend)
    assert torch.equal(got['out'][0, 1:-1], torch.zeros_like(got['out'][0, 1:-1]))
    assert torch.isneginf(got['lse'][0, 1:-1]).all() and torch.isfinite(got['lse'][0, [0, -1]]).all()
    for name in ('dq', 'dk', 'dv', 'drpb'):
        assert torch.isfinite(got[name]).all(), name
    truth = _forward_backward(1, q.double(), k.double(), v.double(), dict(kernel_size=3, rpb=rpb.double()), 'torch')
    for name in truth:
        assert_close(name, got[name], truth[name], 1e-5)


@pytest.mark.parametrize('head_dim', [16, 48, 64, 128, 256])
def test_triton_head_dims(head_dim):
    dtype = torch.bfloat16 if head_dim == 256 else torch.float32
    q, k, v = _random_qkv(1, (7, 9), 2, 1, head_dim, dtype=dtype, seed=head_dim)
    kwargs = _triton_case_kwargs(2, 2, 3, 1, (2, 1), False, head_dim == 64, dtype)
    got = _forward_backward(2, q, k, v, kwargs, 'triton')
    truth = _forward_backward(2, q.double(), k.double(), v.double(), _double(kwargs), 'torch')
    for name in truth:
        assert_close(name, got[name], truth[name], 2 * TOL[dtype])


def test_triton_empty_batch():
    q, k, v = (t.requires_grad_() for t in _random_qkv(0, (8, 8), 2, 2, 16))
    out = na2d(q, k, v, 3, backend='triton')
    out.sum().backward()
    assert out.shape == (0, 8, 8, 2, 16) and q.grad.shape == q.shape


def test_triton_non_contiguous_inputs():
    q, k, v = (t.transpose(1, 2) for t in _random_qkv(1, (10, 12), 2, 2, 16))
    assert not q.is_contiguous()
    assert_close('out', na2d(q, k, v, 5, backend='triton'), na2d(q, k, v, 5, backend='torch'), 1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_triton_random_sweep(data):
    """Random (size, kernel, dilation, stride, causal) of rank 1-3, plus bias or GQA: Triton forward and backward
    against the float64 reference."""
    rank = data.draw(st.integers(1, 3), label='rank')
    max_kernel = {1: 9, 2: 6, 3: 3}[rank]
    kernel, stride, dilation, causal, spatial = [], [], [], [], []
    for _ in range(rank):
        K = data.draw(st.integers(2, max_kernel))
        d = data.draw(st.integers(1, 3 if rank < 3 else 2))
        kernel.append(K)
        dilation.append(d)
        stride.append(data.draw(st.integers(1, K)))
        causal.append(data.draw(st.booleans()))
        spatial.append(data.draw(st.integers(K * d, K * d + (9 if rank < 3 else 3))))
    use_rpb = all(s == 1 for s in stride) and data.draw(st.booleans(), label='rpb')
    heads_kv = data.draw(st.sampled_from([1, 2]), label='heads_kv')
    seed = data.draw(st.integers(0, 2 ** 16), label='seed')
    q, k, v = _random_qkv(1, spatial, 2, heads_kv, 16, seed=seed)
    kwargs = _triton_case_kwargs(rank, 2, tuple(kernel), tuple(stride), tuple(dilation), tuple(causal), use_rpb,
                                 torch.float32, seed)
    got = _forward_backward(rank, q, k, v, kwargs, 'triton', seed)
    truth = _forward_backward(rank, q.double(), k.double(), v.double(), _double(kwargs), 'torch', seed)
    for name in truth:
        assert_close(name, got[name], truth[name], 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# additional (global) keys and values, merged through the logsumexp

def _dense_with_extra(q, k, v, mask, extra_k, extra_v, scale):
    """Dense softmax over [neighbourhood keys | extra tokens], the extra tokens visible to every query."""
    n, m = mask.shape[0], extra_k.shape[1]
    flat = lambda t: t.reshape(t.shape[0], -1, t.shape[-2], t.shape[-1])
    keys = torch.cat([flat(k), extra_k], 1)
    values = torch.cat([flat(v), extra_v], 1)
    full_mask = torch.cat([mask, torch.ones(n, m, dtype=torch.bool)], 1)
    out, lse = _dense_masked_attention(flat(q), keys, values, full_mask, scale)
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])


@pytest.mark.parametrize('backend', ['torch', 'triton'])
@pytest.mark.parametrize('rank,spatial,kernel,dilation,causal', [
    (1, (21,), 5, 2, True),
    (2, (9, 11), (3, 5), (2, 1), (False, True)),
])
def test_additional_keys_values(backend, rank, spatial, kernel, dilation, causal):
    dtype = torch.float64 if backend == 'torch' else torch.float32
    q, k, v = _random_qkv(2, spatial, 4, 2, 16, 8, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    extra_k = torch.randn(2, 5, 2, 16, generator=gen).to(dtype)
    extra_v = torch.randn(2, 5, 2, 8, generator=gen).to(dtype)
    to_tuple = lambda x: x if isinstance(x, tuple) else (x,) * rank
    mask = neighbourhood_mask(spatial, to_tuple(kernel), (1,) * rank, to_tuple(dilation), to_tuple(causal))

    def ours(q, k, v, extra_k, extra_v):
        out, lse = NA_FNS[rank](q, k, v, kernel, 1, dilation, causal, return_lse=True, backend=backend,
                                additional_keys=extra_k, additional_values=extra_v)
        return out * 1.0 + lse[..., None] * 0.25  # the lse carries gradient too

    def dense(q, k, v, extra_k, extra_v):
        out, lse = _dense_with_extra(q.double(), k.double(), v.double(), mask, extra_k.double(), extra_v.double(),
                                     16 ** -0.5)
        return out + lse[..., None] * 0.25

    compare_forward_backward(ours, dense, dict(q=q, k=k, v=v, extra_k=extra_k, extra_v=extra_v),
                             ratio=1e-10 if dtype == torch.float64 else 1e-5)


def test_additional_keys_rejects_bad_arguments():
    q, k, v = _random_qkv(1, (8, 9), 4, 2, 16)
    ek, ev = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    _bad(na2d, 'must be given together', q, k, v, 3, additional_keys=ek)
    _bad(na2d, r'additional_keys must have layout \[batch, tokens, heads, head_dim\]', q, k, v, 3,
         additional_keys=ek[0], additional_values=ev)
    _bad(na2d, "must match q's dtype and device", q, k, v, 3, additional_keys=ek.double(), additional_values=ev)
    _bad(na2d, 'must share batch', q, k, v, 3, additional_keys=ek, additional_values=ev[:, :2])
    _bad(na2d, 'head dims must be', q, k, v, 3, additional_keys=ek[..., :8], additional_values=ev)
    _bad(na2d, r'multiple of heads of additional_keys \(3\)', q, k, v, 3,
         additional_keys=torch.randn(1, 3, 3, 16), additional_values=torch.randn(1, 3, 3, 16))


# ---------------------------------------------------------------------------------------------------------------
# backend choice, compile, flop counting

def test_backend_resolution(monkeypatch):
    q = torch.zeros(1)
    monkeypatch.delenv('VISIONMIX_BACKEND', raising=False)
    assert resolve_backend('auto', q) == 'torch'
    monkeypatch.setenv('VISIONMIX_BACKEND', 'triton')
    assert resolve_backend('auto', q) == 'triton'
    assert resolve_backend('torch', q) == 'torch'
    monkeypatch.setenv('VISIONMIX_BACKEND', 'cuda')
    with pytest.raises(ValueError, match='VISIONMIX_BACKEND'):
        resolve_backend('auto', q)
    monkeypatch.delenv('VISIONMIX_BACKEND')
    with pytest.raises(ValueError, match='backend must be one of'):
        resolve_backend('fast', q)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(ValueError, match='TRITON_INTERPRET'):
        resolve_backend('triton', q)


def test_env_override_selects_triton(monkeypatch):
    q, k, v = _random_qkv(1, (9, 9), 2, 2, 16)
    monkeypatch.setenv('VISIONMIX_BACKEND', 'triton')
    calls = []
    import visionmix.kernels.neighborhood as na_mod
    original = na_mod._triton_forward
    monkeypatch.setattr(na_mod, '_triton_forward', lambda *a: calls.append('fwd') or original(*a))
    import visionmix.kernels.neighborhood.triton_na_bwd as bwd_mod
    original_bwd = bwd_mod.na_backward_triton
    monkeypatch.setattr(bwd_mod, 'na_backward_triton', lambda *a: calls.append('bwd') or original_bwd(*a))
    na2d(q.requires_grad_(), k, v, 3).sum().backward()
    assert calls == ['fwd', 'bwd']


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_torch_compile_fullgraph_module(backend, monkeypatch):
    from visionmix.layers import NeighborhoodAttention2D
    monkeypatch.setenv('VISIONMIX_BACKEND', backend)
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(32, 2, kernel_size=5, dilation=(1, 2), rel_pos_bias=True)
    x = torch.randn(2, 10, 12, 32, requires_grad=True)
    compiled = torch.compile(attn, fullgraph=True)
    out = compiled(x)
    assert_close('out', out, attn(x), 1e-5)
    out.sum().backward()
    grads = [t.grad.clone() for t in (x, attn.rpb, attn.qkv.weight)]
    for t in (x, attn.rpb, attn.qkv.weight):
        t.grad = None
    attn(x).sum().backward()
    for name, g, t in zip(('x', 'rpb', 'qkv.weight'), grads, (x, attn.rpb, attn.qkv.weight)):
        assert_close(name, g, t.grad, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('rank,spatial,kernel,dilation,rpb', [
    (1, (4096,), 63, 1, False),
    (2, (56, 56), 7, 1, True),
    (2, (28, 28), 7, 4, True),
    (3, (8, 32, 32), 7, 1, False),
])
def test_triton_on_gpu_at_model_shapes(rank, spatial, kernel, dilation, rpb, dtype):
    """Compiled kernels (not the interpreter) at NAT/DiNAT and video shapes, forward and backward."""
    q, k, v = (t.cuda() for t in _random_qkv(2, spatial, 4, 4, 32, dtype=dtype, seed=9))
    kwargs = _triton_case_kwargs(rank, 4, kernel, 1, dilation, False, rpb, dtype)
    kwargs = {n: (x.cuda() if torch.is_tensor(x) else x) for n, x in kwargs.items()}
    got = _forward_backward(rank, q, k, v, kwargs, 'triton')
    same_dtype = _forward_backward(rank, q, k, v, kwargs, 'torch')
    truth = _forward_backward(rank, q.float(), k.float(), v.float(),
                              {n: (x.float() if torch.is_tensor(x) else x) for n, x in kwargs.items()}, 'torch')
    for name in truth:
        tol = max(TOL[dtype], 2 * rel_rms_error(same_dtype[name], truth[name]))
        assert_close(name, got[name], truth[name], tol)


def test_flop_counter_counts_attention():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v = (t.to('meta') for t in _random_qkv(2, (14, 14), 4, 4, 32))
    with FlopCounterMode(display=False) as counter:
        na2d(q, k, v, 7)
    assert counter.get_total_flops() == 2 * (2 * 14 * 14 * 4) * 49 * (32 + 32)


# ---------------------------------------------------------------------------------------------------------------
# bad input: a ValueError naming the argument and the constraint

def _bad(fn, match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_rejects_bad_arguments():
    q, k, v = _random_qkv(1, (8, 9), 2, 2, 16)
    _bad(na2d, r'q must have layout \[batch, X, Y, heads, head_dim\]', q[0], k, v, 3)
    _bad(na1d, r'layout \[batch, X, heads, head_dim\]', q, k, v, 3)
    _bad(na2d, r'kernel_size \* dilation must not exceed.*axis 0.*7 \* dilation 2 = 14 > size 8', q, k, v, 7,
         dilation=2)
    _bad(na2d, r'kernel_size \* dilation must not exceed', q, k, v, 10)
    _bad(na2d, r'kernel_size must be >= 2', q, k, v, 1)
    _bad(na2d, r'kernel_size must be an int or a tuple of 2 values', q, k, v, (3, 3, 3))
    _bad(na2d, r'stride must satisfy 1 <= stride <= kernel_size', q, k, v, 3, stride=4)
    _bad(na2d, r'dilation must be >= 1', q, k, v, 3, dilation=0)
    _bad(na2d, r'q, k and v must share one dtype', q, k.double(), v, 3)
    _bad(na2d, r'q, k and v must be on one device', q, k.to('meta'), v, 3)
    _bad(na2d, r'q and k must share batch and spatial shape', q, k[:, :7], v[:, :7], 3)
    _bad(na2d, r'heads of q \(2\) must be a multiple of heads of k/v \(3\)', q, *_random_qkv(1, (8, 9), 3, 3, 16)[1:],
         3)
    _bad(na2d, r'rpb must have shape \(heads, \*\(2 \* kernel_size - 1\)\) = \(2, 5, 5\)', q, k, v, 3,
         rpb=torch.zeros(2, 3, 3))
    _bad(na2d, r'rpb is defined for stride 1 only', q, k, v, 3, stride=2, rpb=torch.zeros(2, 5, 5))
    _bad(na2d, r'must be a floating-point tensor', q.long(), k.long(), v.long(), 3)
    _bad(na2d, r'triton backend supports float16, bfloat16 and float32', q.double(), k.double(), v.double(), 3,
         backend='triton')
