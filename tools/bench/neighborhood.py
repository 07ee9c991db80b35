"""Neighborhood-attention cases (``--op na1d|na2d|na3d``) and their baselines: SDPA dense and masked, flex, NATTEN."""
import argparse
import dataclasses
import math
import sys
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from visionmix.kernels import na1d, na2d, na3d
from visionmix.kernels.neighborhood.reference import neighbourhood_mask

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

OPS = {'na1d': na1d, 'na2d': na2d, 'na3d': na3d}
IMPLS = ('visionmix', 'visionmix-ref', 'sdpa-dense', 'sdpa-masked', 'flex', 'natten')
DENSE_CHECK_ROWS = 256
TABLE = Table([('case', lambda r: r['case']), ('shape', lambda r: r['shape']),
               ('kernel', lambda r: join_dims(r['kernel_size'])), ('dilation', lambda r: join_dims(r['dilation'])),
               ('mode', lambda r: r['mode']), ('impl', lambda r: r['impl'])])


@dataclasses.dataclass
class OpCase:
    """One neighborhood-attention problem: heads-last tensors ``[batch, *spatial, heads, head_dim]``."""
    name: str
    spatial: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    heads: int
    head_dim: int
    batch: int
    is_causal: bool = False

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def seq_len(self) -> int:
        return math.prod(self.spatial)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    def label(self) -> str:
        return join_dims(self.shape)

    def to_heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *spatial, H, D]`` -> contiguous ``[B, H, N, D]``."""
        return x.flatten(1, self.rank).transpose(1, 2).contiguous()

    def to_heads_last(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` -> ``[B, *spatial, H, D]`` (a view)."""
        return x.transpose(1, 2).unflatten(1, tuple(self.spatial))

    def row_fields(self) -> dict:
        return dict(case=self.name, shape=self.label(), batch=self.batch, spatial=list(self.spatial),
                    kernel_size=list(self.kernel_size), dilation=list(self.dilation), is_causal=self.is_causal,
                    heads=self.heads, head_dim=self.head_dim, tokens=self.batch * self.seq_len)


def default_op_cases(op: str, batch: int) -> List[OpCase]:
    """NAT/DiNAT stage shapes at 224/384/512 px (kernel 7, head dim 32 as in NAT, plus 64 and 128),
    long 1-D sequences and 3-D video volumes."""
    if op == 'na1d':
        return [
            OpCase('seq-3136-k49', (3136,), (49,), (1,), 2, 32, batch),
            OpCase('seq-16384-k49', (16384,), (49,), (1,), 2, 32, batch),
            OpCase('seq-16384-k49-hd64', (16384,), (49,), (1,), 4, 64, batch),
            OpCase('seq-16384-k49-hd128', (16384,), (49,), (1,), 4, 128, batch),
            OpCase('seq-3136-k49-dil8', (3136,), (49,), (8,), 2, 32, batch),
        ]
    if op == 'na3d':
        return [
            OpCase('video-16x32x32-k7', (16, 32, 32), (7, 7, 7), (1, 1, 1), 4, 32, batch),
            OpCase('video-16x32x32-k7-hd64', (16, 32, 32), (7, 7, 7), (1, 1, 1), 4, 64, batch),
            OpCase('video-16x32x32-k7-hd128', (16, 32, 32), (7, 7, 7), (1, 1, 1), 4, 128, batch),
            OpCase('video-8x28x28-k3x7x7', (8, 28, 28), (3, 7, 7), (1, 1, 1), 4, 32, batch),
            OpCase('video-8x28x28-k3x7x7-dil2', (8, 28, 28), (3, 7, 7), (1, 2, 2), 4, 32, batch),
        ]
    return [
        OpCase('nat-224-stage1', (56, 56), (7, 7), (1, 1), 2, 32, batch),
        OpCase('nat-224-stage2', (28, 28), (7, 7), (1, 1), 4, 32, batch),
        OpCase('nat-224-stage3', (14, 14), (7, 7), (1, 1), 8, 32, batch),
        OpCase('nat-384-stage1', (96, 96), (7, 7), (1, 1), 2, 32, batch),
        OpCase('nat-384-stage2', (48, 48), (7, 7), (1, 1), 4, 32, batch),
        OpCase('nat-512-stage1', (128, 128), (7, 7), (1, 1), 2, 32, batch),
        OpCase('nat-512-stage2', (64, 64), (7, 7), (1, 1), 4, 32, batch),
        OpCase('nat-224-stage1-hd64', (56, 56), (7, 7), (1, 1), 2, 64, batch),
        OpCase('nat-224-stage1-hd128', (56, 56), (7, 7), (1, 1), 2, 128, batch),
        OpCase('dinat-224-stage1-dil8', (56, 56), (7, 7), (8, 8), 2, 32, batch),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Implementations


def make_visionmix(case: OpCase, op: str, backend: str) -> OpImpl:
    op_fn = OPS[op]
    name = 'visionmix' if backend == 'auto' else 'visionmix-ref'

    def fn(q, k, v):
        return op_fn(q, k, v, case.kernel_size, dilation=case.dilation, is_causal=case.is_causal, backend=backend)
    return OpImpl(name, fn)


def dense_attention_rows(q, k, v, rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Plain softmax attention over all tokens for query ``rows`` of batch 0: ``[R, H, D]`` in float32."""
    qf = q[:1].flatten(1, rank)[0, rows].float()
    kf, vf = (t[:1].flatten(1, rank)[0].float() for t in (k, v))
    scores = torch.einsum('rhd,nhd->hrn', qf, kf) * q.shape[-1] ** -0.5
    return torch.einsum('hrn,nhd->rhd', scores.softmax(-1), vf)


def make_sdpa_dense(case: OpCase) -> OpImpl:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def check(out, q, k, v):
        rows = torch.linspace(0, case.seq_len - 1, min(DENSE_CHECK_ROWS, case.seq_len), device=q.device).long()
        return relative_error(out[:1].flatten(1, case.rank)[0, rows], dense_attention_rows(q, k, v, rows, case.rank))
    return OpImpl('sdpa-dense', fn, layout='heads_first', note='all tokens, no mask (upper bound)', check=check,
                  check_what='dense attention')


def make_sdpa_masked(case: OpCase, mask: torch.Tensor) -> OpImpl:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return OpImpl('sdpa-masked', fn, layout='heads_first')


def make_flex(case: OpCase, mask: torch.Tensor, device: torch.device, with_flex: bool) -> OpImpl:
    if device.type == 'cpu' and not with_flex:
        return OpImpl('flex', skip='on CPU compiling flex_attention costs ~20 s per shape; pass --with-flex')
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return OpImpl('flex', skip=f'flex_attention unavailable ({err})')

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    torch._dynamo.reset()  # one compiled graph per case; avoids the recompile limit across many shapes
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=case.seq_len, KV_LEN=case.seq_len,
                                   device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)
    no_backward = 'flex_attention has no backward on CPU' if device.type == 'cpu' else None
    return OpImpl('flex', fn, layout='heads_first', no_backward=no_backward,
                  note=f'block sparsity {block_mask.sparsity():.0f}%')


def make_natten(case: OpCase) -> OpImpl:
    try:
        import natten
    except ImportError as err:
        return OpImpl('natten', skip=f'natten is not installed ({err})')
    name = f'na{case.rank}d'
    op_fn = getattr(natten, name, None) or getattr(getattr(natten, 'functional', None), name, None)
    if op_fn is None:
        return OpImpl('natten', skip=f'natten {getattr(natten, "__version__", "?")} has no {name}')

    def fn(q, k, v):
        return op_fn(q, k, v, kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)
    return OpImpl('natten', fn, note=f'natten {getattr(natten, "__version__", "")}'.strip())


def build_op_impls(case: OpCase, op: str, device: torch.device, names: Sequence[str], with_flex: bool) -> List[OpImpl]:
    """Every requested implementation for ``case``; those that cannot run carry a ``skip`` reason."""
    mask = None
    if {'sdpa-masked', 'flex'} & set(names):
        mask = neighbourhood_mask(case.spatial, case.kernel_size, (1,) * case.rank, case.dilation,
                                  (case.is_causal,) * case.rank, device)
    return build_impls({
        'visionmix': lambda: make_visionmix(case, op, 'auto'),
        'visionmix-ref': lambda: make_visionmix(case, op, 'torch'),
        'sdpa-dense': lambda: make_sdpa_dense(case),
        'sdpa-masked': lambda: make_sdpa_masked(case, mask),
        'flex': lambda: make_flex(case, mask, device, with_flex),
        'natten': lambda: make_natten(case),
    }, names)


def make_op_inputs(case: OpCase, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    return random_inputs(case.shape, device, dtype)


def benchmark_op_case(case: OpCase, op: str, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    """All rows (implementations x modes) for one case."""
    impls = build_op_impls(case, op, device, args.impls, args.with_flex)
    q, k, v = make_op_inputs(case, device, dtype)
    rows = benchmark_case(case, impls, q, k, v, args, device, dtype)
    del q, k, v, impls
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line


def per_axis(dims: Tuple[int, ...], rank: int, flag: str, parser: argparse.ArgumentParser) -> Tuple[int, ...]:
    if len(dims) == 1:
        return dims * rank
    if len(dims) != rank:
        parser.error(f'{flag} needs 1 or {rank} values for this op, got {len(dims)}')
    return dims


def custom_op_case(args, parser: argparse.ArgumentParser) -> OpCase:
    """The one case described by ``--shape`` (spatial dims, or the full ``BxSPATIALxHxD`` shape) and friends."""
    rank = int(args.op[2])
    dims = parse_dims(args.shape, '--shape', parser)
    batch, heads, head_dim = args.batch, args.heads, args.head_dim
    if len(dims) == rank + 3:
        given = [flag for flag, value in (('--batch', args.batch), ('--heads', args.heads),
                                          ('--head-dim', args.head_dim)) if value is not None]
        if given:
            parser.error(f'--shape {args.shape} already sets batch, heads and head_dim; drop {", ".join(given)}')
        batch, spatial, heads, head_dim = dims[0], dims[1:-2], dims[-2], dims[-1]
    elif len(dims) == rank:
        spatial = dims
    else:
        parser.error(f'--shape for {args.op} takes {rank} spatial dims or the full shape of {rank + 3} dims '
                     f'(batch x spatial x heads x head_dim), got {args.shape!r}')
    kernel_size = per_axis(parse_dims(args.kernel_size or '7', '--kernel-size', parser), rank, '--kernel-size', parser)
    dilation = per_axis(parse_dims(args.dilation or '1', '--dilation', parser), rank, '--dilation', parser)
    name = join_dims(spatial) + '-k' + join_dims(kernel_size)
    if any(d > 1 for d in dilation):
        name += '-dil' + join_dims(dilation)
    if args.causal:
        name += '-causal'
    return OpCase(name, spatial, kernel_size, dilation, heads or 4, head_dim or 32,
                  batch or default_batch(args), args.causal)


def validate_op_case(case: OpCase, op: str, parser: argparse.ArgumentParser) -> None:
    """Let visionmix check the arguments on meta tensors so a bad case fails before any timing."""
    q = torch.empty(case.shape, device='meta')
    try:
        OPS[op](q, q, q, case.kernel_size, dilation=case.dilation, is_causal=case.is_causal, backend='torch')
    except ValueError as err:
        parser.error(f'case {case.name}: {err}')


def run(args, parser: argparse.ArgumentParser) -> Tuple[dict, str]:
    """Benchmark ``args.op`` over the default cases, or the one custom case; returns the result and file stem."""
    if args.shape is not None:
        cases = [custom_op_case(args, parser)]
    else:
        cases = default_op_cases(args.op, args.batch or default_batch(args))
    for case in cases:
        validate_op_case(case, args.op, parser)
    dtype = DTYPES[args.dtype]
    rows = []
    for case in tqdm(cases, desc=f'{args.op} {args.mode} {args.dtype}', unit='case', file=sys.stderr):
        rows += benchmark_op_case(case, args.op, args, args.device, dtype)
    add_ratios(rows, 'case')
    result = result_header(args, 'op', f'{args.op} {args.mode} {args.dtype}')
    result.update(op=args.op, rows=rows)
    stem = f'{args.op}_{args.mode}_{args.dtype}'
    if args.shape is not None:
        stem += f'_{cases[0].name}'
    return result, stem
