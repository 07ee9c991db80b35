"""Global linear-attention cases (``--op linear``) for ``visionmix.kernels.linear_attention`` and its baselines:
the same forms with the N x N weights materialised in PyTorch, flash-linear-attention (causal, a different
operation) and flash-bidirectional-linear-attention, both only for the plain normalized form."""
import argparse
import dataclasses
import math
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from visionmix.kernels.linear_attention import DEFAULT_FEATURE_MAP, linear_attention, rotate_every_two
from visionmix.kernels.linear_attention.reference import feature_map_fn

from .common import (
    DTYPES,
    OpImpl,
    Table,
    add_ratios,
    benchmark_case,
    build_impls,
    default_batch,
    free_memory,
    join_dims,
    parse_dims,
    random_inputs,
    relative_error,
    result_header,
)

IMPLS = ('visionmix', 'visionmix-ref', 'torch-quadratic', 'fla', 'fbi-la')
ROPE_FORMS = ('mala', 'rala')  # MAViT and RAVLT rotate the numerator's features with 2-D RoPE
CHECK_ROWS = 256
# Largest B * heads * N * N for torch-quadratic, which holds up to three such weight tensors at once
# (plus their autograd copies in fwdbwd).
QUADRATIC_MAX_WEIGHTS = {'cuda': 2 ** 30, 'cpu': 2 ** 26}
TABLE = Table([('case', lambda r: r['case']), ('shape', lambda r: r['shape']), ('form', lambda r: r['form']),
               ('features', lambda r: r['feature_map']), ('rope', lambda r: 'yes' if r['rope'] else 'no'),
               ('mode', lambda r: r['mode']), ('impl', lambda r: r['impl'])])


@dataclasses.dataclass
class LinearCase:
    """One linear-attention problem: heads-last tensors ``[batch, tokens, heads, head_dim]``; ``spatial`` is the
    token count ``(N,)`` or the ``(H, W)`` of a row-major token map (which sets the RoPE tables)."""
    name: str
    spatial: Tuple[int, ...]
    heads: int
    head_dim: int
    batch: int
    form: str = 'normalized'
    feature_map: Optional[str] = None  # None: the form's default
    rope: bool = False

    def __post_init__(self):
        if self.feature_map is None:
            self.feature_map = DEFAULT_FEATURE_MAP.get(self.form, 'identity')

    @property
    def seq_len(self) -> int:
        return math.prod(self.spatial)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.batch, self.seq_len, self.heads, self.head_dim)

    def label(self) -> str:
        return join_dims((self.batch, *self.spatial, self.heads, self.head_dim))

    def to_heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, H, D]`` -> contiguous ``[B, H, N, D]``."""
        return x.transpose(1, 2).contiguous()

    def to_heads_last(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` -> ``[B, N, H, D]`` (a view)."""
        return x.transpose(1, 2)

    def row_fields(self) -> dict:
        return dict(case=self.name, shape=self.label(), batch=self.batch, spatial=list(self.spatial),
                    heads=self.heads, head_dim=self.head_dim, form=self.form, feature_map=self.feature_map,
                    rope=self.rope, tokens=self.batch * self.seq_len)


def default_linear_cases(batch: int) -> List[LinearCase]:
    """Stage shapes of the models on the op at 224 px: MAViT (mala) and RAVLT (rala) stages 1-2 with 2-D RoPE,
    InLine-DeiT-T (cls + 14x14 tokens) and InLine-Swin-T stage 1 (one global window), L2ViT-T stage 1, and the
    plain normalized form with ReLU features at 56x56 and 128x128 (16,384 tokens) to show linear scaling."""
    return [
        LinearCase('mavit-224-stage1', (56, 56), 1, 64, batch, 'mala', rope=True),
        LinearCase('mavit-224-stage2', (28, 28), 2, 64, batch, 'mala', rope=True),
        LinearCase('ravlt-224-stage1', (56, 56), 1, 64, batch, 'rala', rope=True),
        LinearCase('ravlt-224-stage2', (28, 28), 2, 64, batch, 'rala', rope=True),
        LinearCase('inline-deit-t-224', (197,), 6, 32, batch, 'inline'),
        LinearCase('inline-swin-t-224-stage1', (56, 56), 3, 32, batch, 'inline'),
        LinearCase('l2vit-t-224-stage1', (56, 56), 3, 32, batch, 'l2vit'),
        LinearCase('relu-56x56', (56, 56), 4, 64, batch, 'normalized', 'relu'),
        LinearCase('relu-128x128', (128, 128), 4, 64, batch, 'normalized', 'relu'),
    ]


def rope_tables(spatial: Sequence[int], head_dim: int, device, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """``(cos, sin)`` ``[N, head_dim]`` as MAViT/RAVLT build them for an H x W map (1 x N for a token count);
    random angles where that builder does not apply (head_dim not divisible by 4)."""
    height, width = spatial if len(spatial) == 2 else (1, spatial[0])
    try:
        from visionmix.models.mala import RotaryEmbedding2d
        cos, sin = RotaryEmbedding2d(head_dim)(height, width, torch.float32, torch.device('cpu'))
    except (ImportError, ValueError):
        generator = torch.Generator(device='cpu').manual_seed(2)
        angle = torch.rand(height * width, head_dim // 2, generator=generator) * 2 * math.pi
        cos, sin = angle.repeat_interleave(2, -1).cos(), angle.repeat_interleave(2, -1).sin()
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def case_kwargs(case: LinearCase, device, dtype: torch.dtype) -> dict:
    """The ``linear_attention`` keyword arguments of the case: RoPE tables and L2ViT's per-head temperature
    (initialised to ``head_dim ** -0.5`` as in the model)."""
    kwargs = dict(form=case.form, feature_map=case.feature_map, rope=None, temperature=None)
    if case.rope:
        kwargs['rope'] = rope_tables(case.spatial, case.head_dim, device, dtype)
    if case.form == 'l2vit':
        kwargs['temperature'] = torch.full((case.heads,), case.head_dim ** -0.5, device=device, dtype=dtype)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Implementations


def make_visionmix(kwargs: dict, backend: str) -> OpImpl:
    def fn(q, k, v):
        return linear_attention(q, k, v, backend=backend, **kwargs)
    return OpImpl('visionmix' if backend == 'auto' else 'visionmix-ref', fn)


def quadratic_linear_attention(q, k, v, form: str, feature_map: str, rope=None, temperature=None, eps: float = 1e-6,
                               denom_floor: float = 100.0) -> torch.Tensor:
    """Every form with its ``[B, H, N, N]`` attention weights materialised: ``[B, H, N, D]`` in and out.

    Each output row is ``sum_j W_ij v_j``; the mean-of-values terms of mala and inline become ``b_i / N`` added
    to every weight of row ``i``. The weights stay in the input dtype; the per-row and per-key factors (O(N))
    are computed in float32, as a softmax would be.
    """
    n_keys, scale, dtype = k.shape[2], q.shape[-1] ** -0.5, q.dtype
    qf, kf = feature_map_fn(q, feature_map), feature_map_fn(k, feature_map)
    scores = qf @ kf.transpose(-1, -2)  # un-rotated: the normaliser's
    num_scores = scores
    if rope is not None:
        cos, sin = rope
        qr, kr = qf * cos + rotate_every_two(qf) * sin, kf * cos + rotate_every_two(kf) * sin
        num_scores = qr @ kr.transpose(-1, -2)
    if form == 'rala':  # keys weighted by N * softmax_j(scale * mean_i(q_i) . k_j)
        logits = scale * (qf.float().mean(2, keepdim=True) @ kf.float().transpose(-1, -2))
        key_weights = (torch.softmax(logits, dim=-1) * n_keys).to(dtype)
        scores, num_scores = scores * key_weights, num_scores * key_weights
    den = scores.sum(-1, keepdim=True, dtype=torch.float32)
    shift = None  # b_i / N, added to every weight of row i
    if form == 'normalized':
        factor = 1.0 / (den + eps)
    elif form == 'rala':
        c = 1.0 / n_keys
        factor = c / (c * den + eps)
    elif form == 'mala':
        c = scale / n_keys
        factor, shift = c * (1.0 + 1.0 / (c * den + eps)), -c * den / n_keys
    elif form == 'inline':
        c = scale / n_keys
        factor, shift = torch.full_like(den, c), (1.0 - c * den) / n_keys
    elif form == 'l2vit':
        tau = temperature.float()[:, None, None] if temperature is not None else 1.0
        factor = tau / den.clamp_min(denom_floor)
    else:
        raise ValueError(f'unknown form {form!r}')
    weights = num_scores * factor.to(dtype)
    if shift is not None:
        weights = weights + shift.to(dtype)
    return weights @ v


def make_quadratic(case: LinearCase, kwargs: dict, device: torch.device) -> OpImpl:
    n_weights = case.batch * case.heads * case.seq_len ** 2
    budget = QUADRATIC_MAX_WEIGHTS.get(device.type, QUADRATIC_MAX_WEIGHTS['cpu'])
    if n_weights > budget:
        return OpImpl('torch-quadratic', skip=f'B*H*N*N = {n_weights / 2 ** 20:,.0f}Mi attention weights exceed the '
                                              f'{budget / 2 ** 20:,.0f}Mi budget on {device.type}')

    def fn(q, k, v):
        return quadratic_linear_attention(q, k, v, **kwargs)
    return OpImpl('torch-quadratic', fn, layout='heads_first', note='N x N weights materialised (O(N^2))')


def causal_rows(q, k, v, rows: torch.Tensor, feature_map: str) -> torch.Tensor:
    """Causal normalized linear attention of query ``rows`` of batch 0 (keys ``j <= i``): ``[R, H, D]``, float32."""
    qf = feature_map_fn(q[0, rows].float(), feature_map)
    kf, vf = feature_map_fn(k[0].float(), feature_map), v[0].float()
    scores = torch.einsum('rhd,nhd->hrn', qf, kf)
    scores = scores * (torch.arange(k.shape[1], device=q.device)[None, None, :] <= rows[None, :, None])
    den = scores.sum(-1).transpose(0, 1)[..., None]
    return torch.einsum('hrn,nhd->rhd', scores, vf) / den.clamp_min(1e-10)


def library_skip(case: LinearCase, device: torch.device, name: str) -> Optional[str]:
    if case.form != 'normalized':
        return f'only the normalized form maps onto {name}'
    if device.type != 'cuda':
        return f'{name} runs Triton kernels that need CUDA'
    return None


def make_fla(case: LinearCase, device: torch.device) -> OpImpl:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as err:
        return OpImpl('fla', skip=f'flash-linear-attention is not installed ({err})')
    skip = library_skip(case, device, 'fla')
    if skip:
        return OpImpl('fla', skip=skip)

    def fn(q, k, v):
        fm = case.feature_map  # its normalisation divides out ``scale``
        out = chunk_linear_attn(feature_map_fn(q, fm), feature_map_fn(k, fm), v, scale=1.0, normalize=True)
        return out[0] if isinstance(out, tuple) else out  # (output, final state)

    def check(out, q, k, v):
        rows = torch.linspace(0, case.seq_len - 1, min(CHECK_ROWS, case.seq_len), device=q.device).long()
        return relative_error(out[0, rows], causal_rows(q, k, v, rows, case.feature_map))
    return OpImpl('fla', fn, note='causal (a different operation): each query sees keys up to itself',
                  check=check, check_what='causal linear attention')


def import_fbi_la():
    """flash-bidirectional-linear-attention's fused op: package ``flash_bla``, formerly ``fbi_la``."""
    try:
        from flash_bla.ops.linear_attn.fused import linear_attention as op
    except ImportError as err:
        try:
            from fbi_la.ops.linear_attn.attention import linear_attention as op
        except ImportError:
            raise err from None
    return op


def make_fbi_la(case: LinearCase, device: torch.device) -> OpImpl:
    try:
        fbi_linear_attention = import_fbi_la()
    except ImportError as err:
        return OpImpl('fbi-la', skip=f'flash-bidirectional-linear-attention is not installed ({err})')
    skip = library_skip(case, device, 'fbi-la')
    if skip:
        return OpImpl('fbi-la', skip=skip)

    def fn(q, k, v):
        return fbi_linear_attention(feature_map_fn(q, case.feature_map), feature_map_fn(k, case.feature_map), v)
    return OpImpl('fbi-la', fn, layout='heads_first', note='normaliser over key means')


def build_linear_impls(case: LinearCase, device: torch.device, names: Sequence[str],
                       dtype: torch.dtype = torch.float32) -> List[OpImpl]:
    """Every requested implementation for ``case``; those that cannot run carry a ``skip`` reason."""
    kwargs = case_kwargs(case, device, dtype)
    return build_impls({
        'visionmix': lambda: make_visionmix(kwargs, 'auto'),
        'visionmix-ref': lambda: make_visionmix(kwargs, 'torch'),
        'torch-quadratic': lambda: make_quadratic(case, kwargs, device),
        'fla': lambda: make_fla(case, device),
        'fbi-la': lambda: make_fbi_la(case, device),
    }, names)


def make_linear_inputs(case: LinearCase, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    return random_inputs(case.shape, device, dtype)


def benchmark_linear_case(case: LinearCase, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    """All rows (implementations x modes) for one case."""
    impls = build_linear_impls(case, device, args.impls, dtype)
    q, k, v = make_linear_inputs(case, device, dtype)
    rows = benchmark_case(case, impls, q, k, v, args, device, dtype)
    del q, k, v, impls
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line


def custom_linear_case(args, parser: argparse.ArgumentParser) -> LinearCase:
    """The one case described by ``--shape`` (``N`` or ``HxW`` tokens, or the full ``BxNxHEADSxD`` /
    ``BxHxWxHEADSxD`` shape), ``--form`` and ``--feature-map``."""
    dims = parse_dims(args.shape, '--shape', parser)
    batch, heads, head_dim = args.batch, args.heads, args.head_dim
    if len(dims) in (4, 5):
        given = [flag for flag, value in (('--batch', args.batch), ('--heads', args.heads),
                                          ('--head-dim', args.head_dim)) if value is not None]
        if given:
            parser.error(f'--shape {args.shape} already sets batch, heads and head_dim; drop {", ".join(given)}')
        batch, spatial, heads, head_dim = dims[0], dims[1:-2], dims[-2], dims[-1]
    elif len(dims) in (1, 2):
        spatial = dims
    else:
        parser.error(f'--shape for linear takes the tokens (N, or HxW of a token map) or the full heads-last shape '
                     f'(BxNxHEADSxD or BxHxWxHEADSxD), got {args.shape!r}')
    form = args.form or 'normalized'
    case = LinearCase('', spatial, heads or 4, head_dim or 32, batch or default_batch(args), form, args.feature_map,
                      rope=form in ROPE_FORMS)
    case.name = f'{form}-{case.feature_map}-{join_dims(spatial)}' + ('-rope' if case.rope else '')
    return case


def validate_linear_case(case: LinearCase, parser: argparse.ArgumentParser) -> None:
    """Let visionmix check the arguments on meta tensors so a bad case fails before any timing."""
    q = torch.empty(case.shape, device='meta')
    try:
        linear_attention(q, q, q, backend='torch', **case_kwargs(case, 'meta', torch.float32))
    except ValueError as err:
        parser.error(f'case {case.name}: {err}')


def run(args, parser: argparse.ArgumentParser) -> Tuple[dict, str]:
    """Benchmark linear attention over the default cases (those of ``--form`` if given), or the one custom case;
    returns the result and file stem."""
    if args.shape is not None:
        cases = [custom_linear_case(args, parser)]
    else:
        cases = default_linear_cases(args.batch or default_batch(args))
        if args.form is not None:
            cases = [case for case in cases if case.form == args.form]
    for case in cases:
        validate_linear_case(case, parser)
    dtype = DTYPES[args.dtype]
    rows = []
    for case in tqdm(cases, desc=f'linear {args.mode} {args.dtype}', unit='case', file=sys.stderr):
        rows += benchmark_linear_case(case, args, args.device, dtype)
    add_ratios(rows, 'case')
    result = result_header(args, 'op', f'linear attention {args.mode} {args.dtype}')
    result.update(op='linear', rows=rows)
    stem = f'linear_{args.mode}_{args.dtype}'
    if args.shape is not None:
        stem += f'_{cases[0].name}'
    elif args.form is not None:
        stem += f'_{args.form}'
    return result, stem
