"""Selective scan: the reference against mamba-ssm's stored outputs and a closed form, Triton (interpreter on CPU)
against the reference for one direction and several scan orders, outputs, last state and every gradient; bad
input."""
import pytest
import torch

from tests.conftest import parity_files
from visionmix.kernels.selective_scan import (
    selective_scan,
    selective_scan_multidir,
    selective_scan_multidir_reference,
    selective_scan_reference,
)
from visionmix.kernels.testing import assert_close, rel_rms_error

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}
DTYPES = [pytest.param(torch.float32, id='fp32'), pytest.param(torch.float16, id='fp16'),
          pytest.param(torch.bfloat16, id='bf16')]


def closed_form(u, delta, A, B, C, D, delta_bias, softplus):
    """``y[t] = sum_{s<=t} <C[t], exp(A sum_{r=s+1..t} dt[r]) dt[s] u[s] B[s]> + D u[t]`` (float64, one group)."""
    dt = delta + delta_bias[:, None]
    dt = torch.nn.functional.softplus(dt) if softplus else dt
    cum = dt.cumsum(-1)  # [b, d, L]
    gap = cum[..., :, None] - cum[..., None, :]  # [b, d, t, s] = sum_{r=s+1..t} dt[r]
    causal = torch.ones(u.shape[-1], u.shape[-1], dtype=torch.bool).tril()
    decay = torch.exp(gap[..., None] * A[None, :, None, None, :]).masked_fill(~causal[..., None], 0)
    y = torch.einsum('bdtsn,bnt,bns,bds->bdt', decay, C, B, dt * u)
    return y + D[:, None] * u


# ---------------------------------------------------------------------------------------------------------------
# reference

@pytest.mark.parametrize('path', parity_files('kernels', 'selective_scan_*.pt'))
def test_reference_matches_mamba_ssm(path):
    case = torch.load(path, weights_only=True)
    inputs, outputs, softplus = case['inputs'], case['outputs'], case['params']['delta_softplus']
    y, last = selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=softplus,
                                       return_last_state=True)
    assert_close('y', y, outputs['y'], 1e-12, atol=0)
    assert_close('last_state', last, outputs['last_state'], 1e-12, atol=0)
    y32, last32 = selective_scan_reference(**inputs, delta_softplus=softplus, return_last_state=True)
    assert y32.dtype == torch.float32 and last32.dtype == torch.float32
    assert_close('y fp32', y32, outputs['y_ref_fp32'], 1e-6)
    assert_close('last_state fp32', last32, outputs['last_state_ref_fp32'], 1e-6)


@pytest.mark.parametrize('softplus', [False, True])
def test_reference_matches_closed_form(softplus):
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 5, 4, 23
    u, delta = torch.randn(b, d, length, generator=g, dtype=torch.float64), torch.rand(b, d, length, generator=g,
                                                                                        dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2
    B, C = (torch.randn(b, n, length, generator=g, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    y = selective_scan_reference(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=softplus)
    assert_close('closed form', y, closed_form(u, delta, A, B, C, D, bias, softplus), 1e-12, atol=0)


def test_multidir_reference_is_the_sum_of_permuted_scans():
    g = torch.Generator().manual_seed(1)
    b, d, n, length, k_dirs = 2, 6, 4, 15, 3
    u, delta = torch.randn(b, d, length, generator=g, dtype=torch.float64), torch.randn(b, d, length, generator=g,
                                                                                         dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64)
    B, C = (torch.randn(b, n, length, generator=g, dtype=torch.float64) for _ in range(2))
    B_bias = torch.randn(k_dirs, n, length, generator=g, dtype=torch.float64)
    orders = torch.stack([torch.randperm(length, generator=g) for _ in range(k_dirs)])
    for permute in (True, False):
        got = selective_scan_multidir_reference(u, delta, A, B, C, orders, B_bias=B_bias, delta_softplus=True,
                                                permute_params=permute)
        want = torch.zeros_like(u)
        for k, o in enumerate(orders):
            p = o if permute else torch.arange(length)
            y = selective_scan_reference(u[..., o], delta[..., p], A, B[..., p] + B_bias[k], C[..., p],
                                         delta_softplus=True)
            want[..., o] += y
        assert_close(f'permute_params={permute}', got, want, 1e-14, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference

SINGLE_CASES = {
    # name: (batch, dim, dstate, L, B layout, C layout, D, z, delta_bias, softplus)
    'mamba_block': (2, 12, 5, 37, 'var', 'var', True, True, True, True),
    'grouped': (1, 12, 4, 20, 'group2', 'group3', True, False, True, True),
    'time_invariant_b': (2, 8, 3, 17, 'const', 'var', False, False, False, False),
    'one_step': (2, 4, 16, 1, 'var', 'group2', True, True, False, True),
    'two_full_chunks': (1, 20, 8, 32, 'var', 'var', True, False, True, False),
}


def _bc(layout, b, d, n, length, g):
    if layout == 'const':
        return torch.randn(d, n, generator=g)
    if layout == 'var':
        return torch.randn(b, n, length, generator=g)
    return torch.randn(b, int(layout[-1]), n, length, generator=g)


def _single_inputs(name, seed=0):
    b, d, n, length, lb, lc, has_d, has_z, has_bias, softplus = SINGLE_CASES[name]
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(b, d, length, generator=g) * 0.5
    if not softplus:  # without softplus the step sizes are taken as given: keep them positive (a stable scan)
        delta = delta.abs()
    t = {'u': torch.randn(b, d, length, generator=g), 'delta': delta,
         'A': -torch.rand(d, n, generator=g) * 4, 'B': _bc(lb, b, d, n, length, g), 'C': _bc(lc, b, d, n, length, g)}
    if has_d:
        t['D'] = torch.randn(d, generator=g)
    if has_z:
        t['z'] = torch.randn(b, d, length, generator=g)
    if has_bias:
        t['delta_bias'] = torch.randn(d, generator=g) if softplus else torch.rand(d, generator=g)
        t['delta_bias'][0] = 21.0  # the softplus threshold branch
    return t, softplus


def _run(fn, inputs, dtype, backend, seed=0, **kwargs):
    """Output, last state and the gradient of every input for random cotangents of both."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cast = {k: (v if k == 'orders' else v.to(dtype) if k in ('u', 'delta', 'z') or (k in 'BC' and v.dim() > 2)
                else v.to(param_dtype)) for k, v in inputs.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in cast.items() if k != 'orders' and
              v.is_floating_point()}
    args = {**cast, **leaves}
    out, last = fn(**args, return_last_state=True, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(out.dtype)
    dlast = torch.randn(last.shape, generator=g).to(last.dtype)
    grads = torch.autograd.grad((out * dout).sum() + (last * dlast).sum(), list(leaves.values()))
    return {'out': out, 'last_state': last, **{'d' + k: v for k, v in zip(leaves, grads)}}


def _compare(name, fn, inputs, dtype, **kwargs):
    got = _run(fn, inputs, dtype, 'triton', **kwargs)
    truth = _run(fn, inputs, torch.float64, 'torch', **kwargs)
    same_dtype = _run(fn, inputs, dtype, 'torch', **kwargs)
    for key in truth:
        assert got[key].dtype == same_dtype[key].dtype, key
        tol = TOL[dtype] if dtype == torch.float32 else max(TOL[dtype], 2 * rel_rms_error(same_dtype[key],
                                                                                          truth[key]))
        assert_close(f'{name} {key}', got[key], truth[key], tol)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', list(SINGLE_CASES))
def test_triton_matches_reference(name, dtype):
    inputs, softplus = _single_inputs(name)
    _compare(name, selective_scan, inputs, dtype, delta_softplus=softplus)


def _multidir_inputs(seed=0, k_dirs=4, b=2, d=12, n=6, length=30, bias=True):
    g = torch.Generator().manual_seed(seed)
    t = {'u': torch.randn(b, d, length, generator=g), 'delta': torch.randn(b, d, length, generator=g) * 0.5,
         'A': -torch.rand(d, n, generator=g) * 4, 'B': torch.randn(b, n, length, generator=g),
         'C': torch.randn(b, n, length, generator=g), 'D': torch.randn(d, generator=g),
         'delta_bias': torch.randn(d, generator=g),
         'orders': torch.stack([torch.randperm(length, generator=g) for _ in range(k_dirs)])}
    if bias:
        t['B_bias'] = torch.randn(k_dirs, n, length, generator=g)
    return t


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('permute_params', [False, True], ids=['step_indexed', 'permuted'])
def test_triton_multidir_matches_reference(permute_params, dtype):
    inputs = _multidir_inputs(bias=True)
    _compare(f'multidir permute_params={permute_params}', selective_scan_multidir, inputs, dtype,
             delta_softplus=True, permute_params=permute_params)


def test_triton_multidir_grouped_b_matches_reference():
    inputs = _multidir_inputs(seed=2, k_dirs=2, length=20)
    inputs['B'] = torch.randn(2, 3, 6, 20, generator=torch.Generator().manual_seed(7))  # 3 groups of 4 channels
    _compare('multidir grouped B', selective_scan_multidir, inputs, torch.float32, delta_softplus=True,
             permute_params=True)


def test_multidir_with_one_identity_order_is_selective_scan():
    inputs = _multidir_inputs(k_dirs=1, bias=False)
    orders = inputs.pop('orders')
    single = selective_scan(**inputs, delta_softplus=True, backend='triton')
    multi = selective_scan_multidir(**inputs, orders=torch.arange(orders.shape[1])[None], delta_softplus=True,
                                    backend='triton')
    assert torch.equal(single, multi)


@pytest.mark.parametrize('path', parity_files('kernels', 'selective_scan_*.pt'))
def test_triton_matches_mamba_ssm(path):
    case = torch.load(path, weights_only=True)
    inputs, outputs = case['inputs'], case['outputs']
    y, last = selective_scan(**inputs, delta_softplus=case['params']['delta_softplus'], return_last_state=True,
                             backend='triton')
    assert_close('y', y, outputs['y'], TOL[torch.float32])
    assert_close('last_state', last, outputs['last_state'], TOL[torch.float32])


def test_triton_backward_is_deterministic():
    inputs = _multidir_inputs(seed=3, d=8, length=20)
    first = _run(selective_scan_multidir, inputs, torch.float32, 'triton', delta_softplus=True)
    second = _run(selective_scan_multidir, inputs, torch.float32, 'triton', delta_softplus=True)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_meta_tensors_give_shapes():
    u = torch.empty(2, 8, 10, device='meta')
    A, B = torch.empty(8, 4, device='meta'), torch.empty(2, 4, 10, device='meta')
    out, last = selective_scan(u, u, A, B, B, return_last_state=True, backend='triton')
    assert out.shape == (2, 8, 10) and last.shape == (2, 8, 4) and last.dtype == torch.float32
    orders = torch.zeros(3, 10, dtype=torch.long, device='meta')
    out, last = selective_scan_multidir(u, u, A, B, B, orders, return_last_state=True, validate_orders=False,
                                        backend='triton')
    assert out.shape == (2, 8, 10) and last.shape == (2, 3, 8, 4)


def test_torch_compile_fullgraph():
    inputs = _multidir_inputs(seed=4, d=4, length=9, k_dirs=2)
    fn = torch.compile(lambda **kw: selective_scan_multidir(**kw, delta_softplus=True, validate_orders=False,
                                                            backend='triton'), fullgraph=True, backend='eager')
    want = selective_scan_multidir(**inputs, delta_softplus=True, backend='torch')
    assert_close('compiled', fn(**inputs), want, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_rejects_bad_arguments():
    u = torch.randn(2, 8, 10)
    A, B = -torch.rand(8, 4), torch.randn(2, 4, 10)
    selective_scan(u, u, A, B, B)
    bad = [
        (dict(u=u[0]), 'u must be a floating-point tensor with layout'),
        (dict(delta=u[..., :9]), 'delta must have u'),
        (dict(delta=u.double()), "delta must have u's dtype"),
        (dict(A=A[:7]), r'A must have shape \(dim, dstate\)'),
        (dict(A=torch.randn(8, 4, dtype=torch.complex64)), 'complex A is not supported'),
        (dict(B=torch.randn(2, 3, 10)), 'B must have shape'),
        (dict(B=torch.randn(2, 3, 4, 10)), 'divisible by its groups'),
        (dict(C=torch.randn(2, 4)), 'time-invariant C must have shape'),
        (dict(B=B.half()), "B must have u's dtype"),
        (dict(D=torch.randn(7)), r'D must be a floating-point tensor of shape \(dim,\)'),
        (dict(z=torch.randn(2, 8, 9)), "z must have u's shape"),
        (dict(delta_bias=torch.randn(8, 1)), 'delta_bias must be'),
        (dict(backend='cuda'), 'backend must be one of'),
    ]
    for change, message in bad:
        args = {**dict(u=u, delta=u, A=A, B=B, C=B), **change}
        with pytest.raises(ValueError, match=message):
            selective_scan(**args)
    with pytest.raises(ValueError, match='float16, bfloat16 and float32'):
        selective_scan(u.double(), u.double(), A, B.double(), B.double(), backend='triton')
    orders = torch.stack([torch.randperm(10) for _ in range(2)])
    selective_scan_multidir(u, u, A, B, B, orders)
    multi_bad = [
        (dict(orders=orders[:, :9]), r'orders must have shape \(directions, L\)'),
        (dict(orders=orders.float()), 'orders must be an integer tensor'),
        (dict(orders=torch.zeros(2, 10, dtype=torch.long)), 'permutation of range'),
        (dict(B_bias=torch.randn(3, 4, 10)), r'B_bias must be a floating-point tensor of shape'),
        (dict(B=A), 'needs token-dependent B and C'),
    ]
    for change, message in multi_bad:
        args = {**dict(u=u, delta=u, A=A, B=B, C=B, orders=orders), **change}
        with pytest.raises(ValueError, match=message):
            selective_scan_multidir(**args)
