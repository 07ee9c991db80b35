"""Global linear attention: the reference against explicit attention matrices, Triton (interpreter on CPU) against
the reference for every form, outputs and every gradient, and bad input."""
import pytest
import torch

from visionmix.kernels import linear_attention
from visionmix.kernels.linear_attention import apply_rope
from visionmix.kernels.testing import assert_close, rel_rms_error

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def _inputs(n_q, n_k, heads, head_dim, head_dim_v, dtype=torch.float32, seed=0, rope=False, weights=False,
            temperature=False):
    gen = torch.Generator().manual_seed(seed)
    t = {'q': torch.randn(2, n_q, heads, head_dim, generator=gen),
         'k': torch.randn(2, n_k, heads, head_dim, generator=gen),
         'v': torch.randn(2, n_k, heads, head_dim_v, generator=gen)}
    if weights:
        t['key_weights'] = torch.rand(2, n_k, heads, generator=gen) + 0.5
    if temperature:
        t['temperature'] = torch.rand(heads, generator=gen) + 0.1
    t = {n: x.to(dtype) for n, x in t.items()}
    if rope:
        angle = (torch.rand(n_k, head_dim // 2, generator=gen) * 6).repeat_interleave(2, -1)
        t['rope'] = (angle.cos(), angle.sin())
    return t


def _run(inputs, backend, seed=0, **kwargs):
    """Output and the gradient of every differentiable input for a random cotangent."""
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items() if n != 'rope'}
    args = dict(leaves, rope=inputs.get('rope'))
    out = linear_attention(args.pop('q'), args.pop('k'), args.pop('v'), **args, **kwargs, backend=backend)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = torch.autograd.grad((out * dout).sum(), list(leaves.values()))
    return {'out': out, **{'d' + n: g for n, g in zip(leaves, grads)}}


def _double(inputs):
    return {n: (tuple(t.double() for t in x) if n == 'rope' else x.double()) for n, x in inputs.items()}


# ---------------------------------------------------------------------------------------------------------------
# reference: the summary form against the explicit (queries x keys) attention matrix of each family

def _phi(x, name):
    return {'identity': x, 'relu': x.relu(), 'elu1': torch.nn.functional.elu(x) + 1}[name]


def _explicit(q, k, v, form, feature_map, rope=None, key_weights=None, temperature=None, scale=None, eps=1e-6,
              floor=100.0):
    """``out = A v`` with the per-pair weights each paper writes down (QK-first)."""
    n_k, d = k.shape[1], q.shape[-1]
    s = d ** -0.5 if scale is None else scale
    qf, kf = _phi(q, feature_map), _phi(k, feature_map)
    qn, kn = (apply_rope(qf, *rope), apply_rope(kf, *rope)) if rope is not None else (qf, kf)
    w = key_weights
    if form == 'rala':
        w = torch.softmax(s * torch.einsum('bhd,bnhd->bnh', qf.mean(1), kf), dim=1) * n_k
    w = torch.ones(k.shape[:3], dtype=k.dtype) if w is None else w
    pair = torch.einsum('bihd,bjhd->bhij', qn, kn) * w.permute(0, 2, 1)[:, :, None]  # rotated numerator pairs
    den = torch.einsum('bihd,bjhd->bhij', qf, kf).mul(w.permute(0, 2, 1)[:, :, None]).sum(-1, keepdim=True)
    if form in ('normalized', 'rala'):
        c = 1.0 / n_k if form == 'rala' else (1.0 if scale is None else s)
        attn = c * pair / (c * den + eps)
    elif form == 'mala':
        c = s / n_k
        attn = (1 + 1 / (c * den + eps)) * c * pair - c * den / n_k  # beta * s_ij - gamma
    elif form == 'inline':
        c = s / n_k
        attn = c * pair - c * den / n_k + 1.0 / n_k
    else:
        attn = temperature[None, :, None, None] * pair / den.clamp_min(floor)
    return torch.einsum('bhij,bjhe->bihe', attn, v)


@pytest.mark.parametrize('form,options', [
    ('normalized', {}), ('normalized', {'scale': 0.3, 'key_weights': True}), ('rala', {'rope': True}),
    ('mala', {'rope': True}), ('mala', {}), ('inline', {}), ('l2vit', {'temperature': True}),
    ('l2vit', {'temperature': True, 'denom_floor': 1.0}),
])
def test_reference_equals_explicit_attention_matrix(form, options):
    options = dict(options)
    inputs = _inputs(19, 19, 3, 8, 6, torch.float64, rope=options.pop('rope', False),
                     weights=options.pop('key_weights', False), temperature=options.pop('temperature', False))
    got = linear_attention(**inputs, form=form, **options, backend='torch')
    from visionmix.kernels.linear_attention.reference import DEFAULT_FEATURE_MAP
    want = _explicit(**inputs, form=form, feature_map=DEFAULT_FEATURE_MAP[form], scale=options.get('scale'),
                     floor=options.get('denom_floor', 100.0))
    assert_close('out', got, want, 1e-12, atol=1e-12)


def test_inline_rows_sum_to_one_and_mala_without_rope_too():
    """InLine's weights sum to one per query by construction, and so do MALA's without RoPE (up to eps)."""
    inputs = _inputs(11, 11, 2, 8, 8, torch.float64, seed=3)
    ones = torch.ones_like(inputs['v'])
    for form, tol in (('inline', 1e-12), ('mala', 1e-5)):
        out = linear_attention(inputs['q'], inputs['k'], ones, form=form, backend='torch')
        assert_close(form, out, torch.ones_like(out), tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference

TRITON_CASES = [
    # form, n_q, n_k, heads, head_dim, head_dim_v, options
    ('normalized', 37, 37, 2, 16, 16, {}),
    ('normalized', 50, 83, 1, 32, 24, {'key_weights': True, 'feature_map': 'relu', 'scale': 0.5}),
    ('rala', 49, 49, 2, 16, 16, {'rope': True}),
    ('mala', 65, 65, 2, 24, 24, {'rope': True}),
    ('mala', 23, 23, 1, 16, 16, {}),
    ('inline', 70, 45, 3, 32, 32, {}),
    ('l2vit', 64, 64, 2, 32, 32, {'temperature': True}),
    ('l2vit', 30, 30, 2, 16, 16, {'temperature': True, 'denom_floor': 1.0}),
]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', TRITON_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_triton_matches_reference(case, dtype):
    """Output and dq/dk/dv (and key-weight / temperature gradients) against the float64 reference; half types
    within twice the error of the reference run in the same dtype."""
    form, n_q, n_k, heads, d, dv, options = case
    options = dict(options)
    inputs = _inputs(n_q, n_k, heads, d, dv, dtype, seed=n_q, rope=options.pop('rope', False),
                     weights=options.pop('key_weights', False), temperature=options.pop('temperature', False))
    got = _run(inputs, 'triton', form=form, **options)
    truth = _run(_double(inputs), 'torch', form=form, **options)
    same_dtype = _run(inputs, 'torch', form=form, **options) if dtype != torch.float32 else None
    for name in truth:
        assert got[name].dtype == dtype, name
        tol = TOL[dtype] if same_dtype is None else max(TOL[dtype], 2 * rel_rms_error(same_dtype[name], truth[name]))
        assert_close(name, got[name], truth[name], tol)


def test_triton_is_deterministic():
    inputs = _inputs(131, 131, 2, 16, 16, rope=True, seed=4)
    first, second = (_run(inputs, 'triton', form='rala') for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_triton_non_contiguous_inputs():
    inputs = _inputs(40, 40, 2, 16, 16, seed=5)
    q, k, v = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (inputs['q'], inputs['k'], inputs['v']))
    assert not q.is_contiguous()
    assert_close('out', linear_attention(q, k, v, form='inline', backend='triton'),
                 linear_attention(q, k, v, form='inline', backend='torch'), 1e-5)


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_torch_compile_fullgraph(backend):
    inputs = _inputs(33, 33, 2, 16, 16, rope=True, seed=6)

    def attend(q, k, v):
        return linear_attention(q, k, v, form='mala', rope=inputs['rope'], backend=backend)

    q, k, v = (inputs[n].clone().requires_grad_() for n in 'qkv')
    out = torch.compile(attend, fullgraph=True)(q, k, v)
    assert_close('out', out, attend(q, k, v), 1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# bad input

def _bad(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        linear_attention(*args, **kwargs)


def test_rejects_bad_arguments():
    t = _inputs(10, 10, 2, 8, 8, rope=True)
    q, k, v, rope = t['q'], t['k'], t['v'], t['rope']
    _bad(r'form must be one of', q, k, v, form='softmax')
    _bad(r'feature_map must be one of', q, k, v, feature_map='gelu')
    _bad(r'q must have layout \[batch, tokens, heads, head_dim\]', q[0], k, v)
    _bad(r'q, k and v must share one dtype', q, k.double(), v)
    _bad(r'k and v must share batch, tokens and heads', q, k, v[:, :5])
    _bad(r'q and k must share batch, heads and head_dim', q, k[..., :4], v)
    _bad(r'rope must be a \(cos, sin\) pair', q, k, v, rope=rope[0])
    _bad(r'rope needs as many queries as keys', q[:, :5], k, v, rope=rope)
    _bad(r'rope cos must have shape \(tokens, head_dim\) = \(10, 8\)', q, k, v, rope=(rope[0][:5], rope[1]))
    _bad(r'key_weights must have shape \(batch, tokens, heads\)', q, k, v, key_weights=torch.ones(2, 10))
    _bad(r"key_weights cannot be given with form='rala'", q, k, v, form='rala', key_weights=torch.ones(2, 10, 2))
    _bad(r"temperature is used by form='l2vit' only", q, k, v, temperature=torch.ones(2))
    _bad(r'temperature must have shape \(heads,\) = \(2,\)', q, k, v, form='l2vit', temperature=torch.ones(3))
    _bad(r'triton backend supports float16, bfloat16 and float32', q.double(), k.double(), v.double(),
         backend='triton')
